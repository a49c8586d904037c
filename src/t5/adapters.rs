//! LoRA adapters on a T5: attached fresh with PEFT's initialisation, loaded from and saved to PEFT's
//! adapter directory (`adapter_config.json` + `adapter_model.safetensors`), and enumerated as
//! trainable tensors.

use super::lora::{LoraPair, LoraSettings, peft_key};
use super::model::T5;
use super::trainable::{Trainable, a_then_b};
use crate::backend::{Backend, Shaped};
use crate::checkpoint::{Checkpoint, DType, OwnedTensor, write_safetensors};
use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

    /// Every adapter's A and B (`a_then_b`) with their PEFT names and product-precision copies, for
    /// an update that rewrites both at once (`Backend::adam`); `lora_updated` follows it.
    pub fn lora_trainables(&mut self) -> Vec<Trainable<'_, B>> {
        let pairs = self.modules_mut().into_iter().filter_map(|(_, part)| {
            let path = &part.path;
            let LoraPair { a, b, shadow } = part.lora.as_mut()?;
            let (ca, cb) = shadow.as_mut().map(|(ca, cb)| (ca, cb)).unzip();
            Some((
                Trainable { name: peft_key(path, "A"), param: a, copy: ca },
                Trainable { name: peft_key(path, "B"), param: b, copy: cb },
            ))
        });
        a_then_b(pairs.collect::<Vec<_>>()).collect()
    }

    /// `lora_trainables`' names and masters, read-only.
    pub fn lora_tensors(&self) -> Vec<(String, &B::Tensor)> {
        let pairs = self.modules().into_iter().filter_map(|(_, part)| {
            let l = part.lora.as_ref()?;
            Some(((peft_key(&part.path, "A"), &l.a), (peft_key(&part.path, "B"), &l.b)))
        });
        a_then_b(pairs.collect::<Vec<_>>()).collect()
    }

    /// After an update through `lora_trainables`: the merged weights follow the new adapters.
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
    pub fn save_adapter(&self, be: &B, dir: &Path, base_model: Option<&str>) -> Result<()> {
        let settings = self.lora.clone().ok_or_else(|| anyhow!("this model has no LoRA adapter to save"))?;
        let mut tensors = BTreeMap::new();
        for (name, t) in self.lora_tensors() {
            tensors.insert(name, OwnedTensor::from_f32(&be.download(t)?, t.shape(), DType::F32));
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
