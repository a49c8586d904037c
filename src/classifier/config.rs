//! `config.json` of a BERT / RoBERTa sequence classifier in the Hugging Face layout: the shapes, the
//! architecture's position and padding conventions, and the label names the reward model reports.

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use std::path::Path;

/// Detoxify `unbiased` reports only the first 7 of its 16 outputs; the rest are identity subgroups
/// it was trained to be fair across.
pub const UNBIASED_REPORTED: [&str; 7] =
    ["toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit"];
const UNBIASED_OUTPUTS: usize = 16;

/// Detoxify truncates at the tokenizers' `model_max_length`, 512 for every base it uses.
pub const MAX_TOKENS: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `BertForSequenceClassification`: pooler `tanh(dense([CLS]))`, then `classifier`.
    Bert,
    /// `RobertaForSequenceClassification`: `classifier.dense → tanh → classifier.out_proj` on `<s>`,
    /// positions counted from `pad_token_id + 1`.
    Roberta,
}

impl Arch {
    /// The prefix of the encoder's parameter names.
    pub fn prefix(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
        }
    }

    fn class_name(self) -> &'static str {
        match self {
            Arch::Bert => "BertForSequenceClassification",
            Arch::Roberta => "RobertaForSequenceClassification",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub pad_token_id: u32,
    /// Every output's name, in output order (`id2label`).
    pub labels: Vec<String>,
}

impl ClassifierConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("classifier directory {} does not exist or is not a directory", dir.display());
        }
        let path = dir.join("config.json");
        let text = crate::fsutil::read_text(&path)?;
        let json: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&json).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(j: &Value) -> Result<Self> {
        let model_type =
            j.get("model_type").and_then(Value::as_str).ok_or_else(|| anyhow!("missing \"model_type\""))?;
        let arch = match model_type {
            "bert" => Arch::Bert,
            "roberta" => Arch::Roberta,
            other => bail!(
                "model_type is \"{other}\"; detox scores with BERT and RoBERTa sequence classifiers \
                 (model_type \"bert\" or \"roberta\", as Detoxify's original and unbiased models)"
            ),
        };
        if let Some(archs) = j.get("architectures").and_then(Value::as_array) {
            let names: Vec<&str> = archs.iter().filter_map(Value::as_str).collect();
            ensure!(
                names.contains(&arch.class_name()),
                "architectures is {names:?}; detox needs a {} checkpoint (a classification head)",
                arch.class_name()
            );
        }
        let act = j.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu");
        ensure!(act == "gelu", "hidden_act is \"{act}\"; detox runs BERT/RoBERTa's exact (erf) \"gelu\"");
        let pos = j.get("position_embedding_type").and_then(Value::as_str).unwrap_or("absolute");
        ensure!(pos == "absolute", "position_embedding_type is \"{pos}\"; detox supports \"absolute\" only");
        let cfg = ClassifierConfig {
            arch,
            vocab_size: usize_field(j, "vocab_size")?,
            hidden_size: usize_field(j, "hidden_size")?,
            num_hidden_layers: usize_field(j, "num_hidden_layers")?,
            num_attention_heads: usize_field(j, "num_attention_heads")?,
            intermediate_size: usize_field(j, "intermediate_size")?,
            max_position_embeddings: usize_field(j, "max_position_embeddings")?,
            type_vocab_size: opt_usize(j, "type_vocab_size")?.unwrap_or(2),
            layer_norm_eps: j.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-12) as f32,
            pad_token_id: opt_usize(j, "pad_token_id")?.unwrap_or(if arch == Arch::Roberta { 1 } else { 0 }) as u32,
            labels: labels(j)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            ensure!(v > 0, "{name} must be positive");
        }
        ensure!(
            self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            (self.pad_token_id as usize) < self.vocab_size,
            "pad_token_id {} is outside vocab_size {}",
            self.pad_token_id,
            self.vocab_size
        );
        ensure!(
            self.max_position_embeddings >= self.position_offset() + 2,
            "max_position_embeddings {} leaves no room for a sequence",
            self.max_position_embeddings
        );
        Ok(())
    }

    pub fn d_head(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The position id of the first token: RoBERTa counts from `pad_token_id + 1` (transformers'
    /// `create_position_ids_from_input_ids`), BERT from 0.
    pub fn position_offset(&self) -> usize {
        match self.arch {
            Arch::Bert => 0,
            Arch::Roberta => self.pad_token_id as usize + 1,
        }
    }

    /// Longest input in tokens, special tokens included.
    pub fn max_tokens(&self) -> usize {
        MAX_TOKENS.min(self.max_position_embeddings - self.position_offset())
    }

    /// How many leading labels are reported: Detoxify `unbiased` reports the first 7 of its 16.
    pub fn reported_labels(&self) -> usize {
        let unbiased = self.labels.len() == UNBIASED_OUTPUTS
            && self.labels.iter().zip(UNBIASED_REPORTED).all(|(have, want)| have == want);
        if unbiased { UNBIASED_REPORTED.len() } else { self.labels.len() }
    }
}

/// `id2label` in output order; its keys must be exactly 0..n.
fn labels(j: &Value) -> Result<Vec<String>> {
    let map = j
        .get("id2label")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("missing \"id2label\": the classifier's label names"))?;
    ensure!(!map.is_empty(), "\"id2label\" is empty: a classifier needs at least one label");
    let mut labels = vec![None; map.len()];
    for (k, v) in map {
        let i: usize = k.parse().map_err(|_| anyhow!("id2label key \"{k}\" is not an output index"))?;
        ensure!(i < labels.len(), "id2label key {i} is past its {} labels (keys must be 0..n)", labels.len());
        let name = v.as_str().ok_or_else(|| anyhow!("id2label[{i}] must be a string, got {v}"))?;
        labels[i] = Some(name.to_string());
    }
    labels.into_iter().enumerate().map(|(i, l)| l.ok_or_else(|| anyhow!("id2label has no entry {i}"))).collect()
}

fn opt_usize(j: &Value, key: &str) -> Result<Option<usize>> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| anyhow!("field \"{key}\" must be a non-negative integer, got {v}")),
    }
}

fn usize_field(j: &Value, key: &str) -> Result<usize> {
    opt_usize(j, key)?.ok_or_else(|| anyhow!("missing integer field \"{key}\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bert() -> Value {
        json!({
            "model_type": "bert", "architectures": ["BertForSequenceClassification"], "vocab_size": 100,
            "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
            "max_position_embeddings": 512, "id2label": {"1": "b", "0": "a"}
        })
    }

    fn err(j: &Value) -> String {
        format!("{:#}", ClassifierConfig::from_json(j).unwrap_err())
    }

    #[test]
    fn labels_follow_output_order_and_bert_defaults_apply() {
        let c = ClassifierConfig::from_json(&bert()).unwrap();
        assert_eq!(c.labels, ["a", "b"]);
        assert_eq!((c.pad_token_id, c.layer_norm_eps, c.position_offset(), c.max_tokens()), (0, 1e-12, 0, 512));
        assert_eq!(c.reported_labels(), 2);
    }

    #[test]
    fn roberta_positions_start_after_the_pad_id() {
        let mut j = bert();
        j["model_type"] = json!("roberta");
        j["architectures"] = json!(["RobertaForSequenceClassification"]);
        j["max_position_embeddings"] = json!(514);
        j["pad_token_id"] = json!(1);
        let c = ClassifierConfig::from_json(&j).unwrap();
        assert_eq!((c.position_offset(), c.max_tokens()), (2, 512));
        j["max_position_embeddings"] = json!(130);
        assert_eq!(ClassifierConfig::from_json(&j).unwrap().max_tokens(), 128);
    }

    #[test]
    fn unbiased_reports_its_first_seven_labels() {
        let mut j = bert();
        let names: Vec<String> =
            UNBIASED_REPORTED.iter().map(|s| s.to_string()).chain((7..16).map(|i| format!("id{i}"))).collect();
        j["id2label"] = Value::Object(names.iter().enumerate().map(|(i, n)| (i.to_string(), json!(n))).collect());
        assert_eq!(ClassifierConfig::from_json(&j).unwrap().reported_labels(), 7);
    }

    #[test]
    fn unsupported_configs_are_named() {
        let mut j = bert();
        j["model_type"] = json!("gpt2");
        assert!(err(&j).contains("model_type is \"gpt2\""), "{}", err(&j));
        let mut j = bert();
        j["architectures"] = json!(["BertForMaskedLM"]);
        assert!(err(&j).contains("BertForSequenceClassification"), "{}", err(&j));
        let mut j = bert();
        j["hidden_act"] = json!("relu");
        assert!(err(&j).contains("hidden_act"), "{}", err(&j));
        let mut j = bert();
        j["num_attention_heads"] = json!(3);
        assert!(err(&j).contains("not divisible"), "{}", err(&j));
        let mut j = bert();
        j["id2label"] = json!({"0": "a", "2": "c"});
        assert!(err(&j).contains("id2label key 2"), "{}", err(&j));
        let mut j = bert();
        j.as_object_mut().unwrap().remove("id2label");
        assert!(err(&j).contains("id2label"), "{}", err(&j));
    }
}
