//! LoRA adapters as PEFT defines them: which modules get one, their initialisation, and the PEFT
//! adapter directory format (`adapter_config.json` + `adapter_model.safetensors`), read and written.

use super::model::T5;
use crate::backend::{Backend, Shaped};
use crate::checkpoint::{Checkpoint, DType, OwnedTensor, write_safetensors};
use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    fn matches(&self, path: &str) -> Result<bool> {
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

impl<B: Backend> T5<B> {
    /// Gives every targeted linear layer a fresh adapter with PEFT's initialisation:
    /// A ~ kaiming_uniform(a = √5) = U(±1/√in), B = 0, so the adapted model starts equal to the base.
    pub fn attach_lora(&mut self, be: &B, settings: LoraSettings, seed: u64) -> Result<usize> {
        settings.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = settings.r;
        let mut count = 0;
        for (inp, part) in self.modules_mut() {
            if !settings.targets.matches(&part.path)? {
                continue;
            }
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-bound..bound)).collect();
            part.lora = Some(LoraPair { a: be.upload(&a, &[r, inp])?, b: be.zeros(&[part.out, r])?, shadow: None });
            count += 1;
        }
        ensure!(count > 0, "LoRA target_modules {:?} match no module of this T5", settings.targets);
        self.lora = Some(settings);
        self.refresh_lora(be)?;
        Ok(count)
    }

    /// Loads a PEFT adapter directory onto this model.
    pub fn load_adapter(&mut self, be: &B, dir: &Path) -> Result<()> {
        let cfg_path = dir.join("adapter_config.json");
        if !dir.is_dir() {
            bail!("adapter directory {} does not exist or is not a directory", dir.display());
        }
        let text = crate::fsutil::read_text(&cfg_path)?;
        let j: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
        let settings = LoraSettings::from_peft_json(&j).with_context(|| format!("in {}", cfg_path.display()))?;
        let weights = adapter_weights_path(dir)?;
        let ckpt = Checkpoint::open_file(&weights)?;
        let r = settings.r;
        let mut count = 0;
        for (inp, part) in self.modules_mut() {
            if !settings.targets.matches(&part.path)? {
                continue;
            }
            let a = ckpt.get_shaped(&peft_key(&part.path, "A"), &[r, inp])?.to_f32();
            let b = ckpt.get_shaped(&peft_key(&part.path, "B"), &[part.out, r])?.to_f32();
            part.lora =
                Some(LoraPair { a: be.upload(&a, &[r, inp])?, b: be.upload(&b, &[part.out, r])?, shadow: None });
            count += 1;
        }
        ensure!(count > 0, "{}: target_modules match no module of this T5", cfg_path.display());
        self.lora = Some(settings);
        self.refresh_lora(be)
    }

    /// Every adapter matrix (A then B, in module order) with its product-precision copy, for an
    /// update that rewrites both at once (`Backend::adam`); `lora_updated` follows it.
    pub fn lora_with_copies(&mut self) -> Vec<(&mut B::Tensor, Option<&mut B::Tensor>)> {
        let mut out = Vec::new();
        for (_, part) in self.modules_mut() {
            if let Some(LoraPair { a, b, shadow }) = part.lora.as_mut() {
                let (ca, cb) = match shadow.as_mut() {
                    Some((ca, cb)) => (Some(ca), Some(cb)),
                    None => (None, None),
                };
                out.extend([(a, ca), (b, cb)]);
            }
        }
        out
    }

    /// After an update through `lora_with_copies`: the merged weights follow the new adapters.
    pub fn lora_updated(&mut self, be: &B) -> Result<()> {
        if self.lora_merged { self.merge_lora(be) } else { Ok(()) }
    }

    /// Remakes the adapters' product-precision copies, and their merged weights if merged, after
    /// their f32 masters changed.
    pub fn refresh_lora(&mut self, be: &B) -> Result<()> {
        for (_, part) in self.modules_mut() {
            if let Some(l) = part.lora.as_mut() {
                l.shadow = match (be.matmul_copy(&l.a)?, be.matmul_copy(&l.b)?) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => None,
                };
            }
        }
        if self.lora_merged { self.merge_lora(be) } else { Ok(()) }
    }

    /// Writes the adapter as PEFT does, atomically file by file.
    pub fn save_adapter(&mut self, be: &B, dir: &Path, base_model: Option<&str>) -> Result<()> {
        let settings = self.lora.clone().ok_or_else(|| anyhow!("this model has no LoRA adapter to save"))?;
        let mut tensors = BTreeMap::new();
        for (_, part) in self.modules_mut() {
            if let Some(p) = &part.lora {
                let path = &part.path;
                tensors
                    .insert(peft_key(path, "A"), OwnedTensor::from_f32(&be.download(&p.a)?, p.a.shape(), DType::F32));
                tensors
                    .insert(peft_key(path, "B"), OwnedTensor::from_f32(&be.download(&p.b)?, p.b.shape(), DType::F32));
            }
        }
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Some(meta))?;
        let cfg = serde_json::to_string_pretty(&settings.to_peft_json(base_model))?;
        crate::fsutil::write_atomic(&dir.join("adapter_config.json"), cfg.as_bytes())
    }
}

fn adapter_weights_path(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("adapter_model.safetensors");
    if p.is_file() {
        Ok(p)
    } else if dir.join("adapter_model.bin").is_file() {
        bail!(
            "{} holds adapter_model.bin (a torch pickle); detox reads adapter_model.safetensors \
             (save the adapter with safe_serialization=True)",
            dir.display()
        )
    } else {
        bail!("adapter weights {} are missing", p.display())
    }
}
