//! `config.json` of a T5 v1.1 / FLAN-T5 checkpoint, read with transformers 4.x and 5.x key conventions.

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f32,
    pub feed_forward_proj: String,
    pub tie_word_embeddings: bool,
    /// transformers 5 writes this beside `tie_word_embeddings: true`; absent in 4.x files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    pub decoder_start_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub dropout_rate: f32,
    pub model_type: String,
}

impl T5Config {
    /// The heads × d_kv width of every attention (not d_model: 384 for flan-t5-small).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// The factor applied to the decoder output before `lm_head`: T5 v1.0 rescales by d_model^-0.5
    /// when the head is tied to the embeddings; FLAN-T5 (untied, or transformers 5's
    /// `scale_decoder_outputs: false`) does not.
    pub fn lm_head_scale(&self) -> Option<f32> {
        (self.tie_word_embeddings && self.scale_decoder_outputs.unwrap_or(true))
            .then(|| (self.d_model as f32).powf(-0.5))
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !dir.is_dir() {
            bail!("model directory {} does not exist or is not a directory", dir.display());
        }
        let text = crate::fsutil::read_text(&path)?;
        let json: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&json).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(j: &Value) -> Result<Self> {
        let model_type = str_field(j, "model_type")?;
        ensure!(
            model_type == "t5",
            "model_type is \"{model_type}\"; detox runs T5 v1.1 / FLAN-T5 checkpoints (model_type \"t5\")"
        );
        let feed_forward_proj = j.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("relu").to_string();
        ensure!(
            feed_forward_proj == "gated-gelu",
            "feed_forward_proj is \"{feed_forward_proj}\"; detox needs the T5 v1.1 / FLAN-T5 \"gated-gelu\" \
             feed-forward (original T5 v1.0 checkpoints use \"relu\" and are not supported)"
        );
        let num_layers = usize_field(j, "num_layers")?;
        let cfg = T5Config {
            vocab_size: usize_field(j, "vocab_size")?,
            d_model: usize_field(j, "d_model")?,
            d_kv: usize_field(j, "d_kv")?,
            d_ff: usize_field(j, "d_ff")?,
            num_layers,
            num_decoder_layers: opt_usize(j, "num_decoder_layers")?.unwrap_or(num_layers),
            num_heads: usize_field(j, "num_heads")?,
            relative_attention_num_buckets: opt_usize(j, "relative_attention_num_buckets")?.unwrap_or(32),
            relative_attention_max_distance: opt_usize(j, "relative_attention_max_distance")?.unwrap_or(128),
            layer_norm_epsilon: j.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            feed_forward_proj,
            // transformers' default when the key is absent is tied.
            tie_word_embeddings: j.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(true),
            scale_decoder_outputs: j.get("scale_decoder_outputs").and_then(Value::as_bool),
            decoder_start_token_id: opt_id(j, "decoder_start_token_id")?.unwrap_or(0),
            eos_token_id: opt_id(j, "eos_token_id")?.unwrap_or(1),
            pad_token_id: opt_id(j, "pad_token_id")?.unwrap_or(0),
            dropout_rate: j.get("dropout_rate").and_then(Value::as_f64).unwrap_or(0.1) as f32,
            model_type,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.num_decoder_layers),
            ("num_heads", self.num_heads),
            ("relative_attention_num_buckets", self.relative_attention_num_buckets),
        ] {
            ensure!(v > 0, "{name} must be positive");
        }
        ensure!(self.relative_attention_num_buckets >= 4, "relative_attention_num_buckets must be at least 4");
        ensure!(
            (0.0..1.0).contains(&self.dropout_rate),
            "dropout_rate {} is outside [0, 1) (T5's dropout probability)",
            self.dropout_rate
        );
        for (name, id) in [
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
            ("decoder_start_token_id", self.decoder_start_token_id),
        ] {
            ensure!((id as usize) < self.vocab_size, "{name} {id} is outside vocab_size {}", self.vocab_size);
        }
        Ok(())
    }

    /// The config.json detox writes: transformers 4.x conventions, which transformers 5 also reads.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("config serializes");
        let o = v.as_object_mut().expect("object");
        o.insert("architectures".into(), serde_json::json!(["T5ForConditionalGeneration"]));
        o.insert("is_encoder_decoder".into(), Value::Bool(true));
        o.insert("dense_act_fn".into(), Value::String("gelu_new".into()));
        o.insert("is_gated_act".into(), Value::Bool(true));
        o.insert("initializer_factor".into(), serde_json::json!(1.0));
        v
    }

    /// FLAN-T5's published shapes (REFERENCE.md), plus `tiny` for fast tests with the real vocabulary.
    pub fn preset(size: &str) -> Result<Self> {
        let (d_model, d_ff, layers, heads) = match size {
            "tiny" => (64, 128, 2, 4),
            "small" => (512, 1024, 8, 6),
            "base" => (768, 2048, 12, 12),
            "large" => (1024, 2816, 24, 16),
            "xl" => (2048, 5120, 24, 32),
            other => bail!("unknown size '{other}' (expected tiny, small, base, large or xl)"),
        };
        Ok(T5Config {
            vocab_size: 32128,
            d_model,
            d_kv: if size == "tiny" { 16 } else { 64 },
            d_ff,
            num_layers: layers,
            num_decoder_layers: layers,
            num_heads: heads,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            tie_word_embeddings: false,
            scale_decoder_outputs: None,
            decoder_start_token_id: 0,
            eos_token_id: 1,
            pad_token_id: 0,
            dropout_rate: 0.1,
            model_type: "t5".into(),
        })
    }
}

fn str_field(j: &Value, key: &str) -> Result<String> {
    j.get(key).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| anyhow!("missing string field \"{key}\""))
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

/// A token id, which some configs write as a list (the first entry is the one generation stops on).
fn opt_id(j: &Value, key: &str) -> Result<Option<u32>> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if !a.is_empty() => opt_id(&serde_json::json!({ key: a[0] }), key),
        Some(v) => {
            v.as_u64().map(|n| Some(n as u32)).ok_or_else(|| anyhow!("field \"{key}\" must be a token id, got {v}"))
        }
    }
}
