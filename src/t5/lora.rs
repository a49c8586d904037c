//! LoRA adapters as PEFT defines them: the trainable pair of one module, which modules get one, and
//! the settings of PEFT's `adapter_config.json`. Attaching, loading and saving them on a model is
//! `t5::adapters`; nothing here needs the model.

use crate::backend::Backend;
use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

/// The trainable low-rank pair of one linear module.
pub struct LoraPair<B: Backend> {
    /// `lora_A.weight [r, in]`
    pub a: B::Tensor,
    /// `lora_B.weight [out, r]`
    pub b: B::Tensor,
    /// a and b in the precision the backend's products read (`Backend::matmul_copy`), remade
    /// whenever they change (`T5::refresh_lora`); None where the backend reads the f32 masters.
    pub shadow: Option<(B::Tensor, B::Tensor)>,
}

/// Which modules a LoRA adapter covers: PEFT's suffix list, or one regular expression that must
/// match the whole module path.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    Names(Vec<String>),
    Regex(String),
}

impl Targets {
    pub(crate) fn matches(&self, path: &str) -> Result<bool> {
        Ok(match self {
            Targets::Names(names) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Targets::Regex(re) => regex::Regex::new(&format!("^(?:{re})$"))
                .with_context(|| format!("target_modules regex {re:?}"))?
                .is_match(path),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Targets,
    /// rsLoRA scales by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
}

impl LoraSettings {
    /// The seed's adapter: r 32, alpha 32, dropout 0.05 on every attention's q and v.
    pub fn seed_default() -> Self {
        Self {
            r: 32,
            alpha: 32.0,
            dropout: 0.05,
            targets: Targets::Names(vec!["q".into(), "v".into()]),
            use_rslora: false,
        }
    }

    pub fn scale(&self) -> f32 {
        if self.use_rslora { self.alpha / (self.r as f32).sqrt() } else { self.alpha / self.r as f32 }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.r > 0, "LoRA r must be positive");
        ensure!((0.0..1.0).contains(&self.dropout), "LoRA dropout must be in [0, 1), got {}", self.dropout);
        if let Targets::Names(n) = &self.targets {
            ensure!(!n.is_empty(), "LoRA target_modules is empty");
        }
        Ok(())
    }

    /// Reads the fields detox needs from a PEFT `adapter_config.json`, ignoring the rest.
    pub fn from_peft_json(j: &Value) -> Result<Self> {
        let peft_type = j.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        ensure!(peft_type == "LORA", "peft_type is \"{peft_type}\"; only LORA adapters are supported");
        for flag in ["use_dora", "use_qalora"] {
            ensure!(
                !j.get(flag).and_then(Value::as_bool).unwrap_or(false),
                "{flag} is true; detox supports plain LoRA adapters"
            );
        }
        ensure!(
            !j.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false),
            "fan_in_fan_out is true, which T5's Linear layers never need"
        );
        let bias = j.get("bias").and_then(Value::as_str).unwrap_or("none");
        ensure!(bias == "none", "bias is \"{bias}\"; only bias \"none\" adapters are supported");
        let r = j.get("r").and_then(Value::as_u64).ok_or_else(|| anyhow!("missing integer field \"r\""))?;
        let alpha = j.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0) as f32;
        let dropout = j.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let targets = match j.get("target_modules") {
            Some(Value::String(s)) => Targets::Regex(s.clone()),
            Some(Value::Array(a)) => Targets::Names(
                a.iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).ok_or_else(|| anyhow!("target_modules entries must be strings"))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => bail!("missing field \"target_modules\""),
        };
        let s = Self {
            r: r as usize,
            alpha,
            dropout,
            targets,
            use_rslora: j.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        };
        s.validate()?;
        Ok(s)
    }

    pub fn to_peft_json(&self, base_model: Option<&str>) -> Value {
        let targets = match &self.targets {
            Targets::Names(n) => json!(n),
            Targets::Regex(r) => json!(r),
        };
        json!({
            "peft_type": "LORA",
            "task_type": "SEQ_2_SEQ_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "modules_to_save": null,
            "base_model_name_or_path": base_model,
        })
    }
}

const PEFT_PREFIX: &str = "base_model.model.";

/// The PEFT key of one LoRA matrix.
pub fn peft_key(module: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{which}.weight")
}
