//! Writes a fine-tuned model as a Hugging Face directory (config.json, f32 model.safetensors,
//! tokenizer.json) that transformers and every detox command load. LoRA-trained models are saved
//! merged (W + scale · B · A, on the host in f32), with the adapter beside them. The directory is
//! written whole under a temporary name, then swapped in.

use super::step::{SftOptimizer, Trainables};
use crate::backend::{Backend, Shaped};
use crate::checkpoint::{Checkpoint, DType, OwnedTensor, write_safetensors};
use crate::t5::T5;
use crate::t5::params::{named_tensors, read_masters};
use anyhow::{Context, Result, anyhow};
use std::collections::BTreeMap;
use std::path::Path;

/// `config.json` of the source model with the stored dtype set to f32.
fn f32_config(src: &Path) -> Result<Vec<u8>> {
    let path = src.join("config.json");
    let mut j: serde_json::Value = serde_json::from_str(&crate::fsutil::read_text(&path)?)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let obj = j.as_object_mut().ok_or_else(|| anyhow!("{} is not a JSON object", path.display()))?;
    for key in ["torch_dtype", "dtype"] {
        if obj.contains_key(key) {
            obj.insert(key.into(), "float32".into());
        }
    }
    Ok(serde_json::to_vec_pretty(&j)?)
}

/// Adds every adapter's `scale · B · A` to its module's weight.
fn merge_adapters<B: Backend>(be: &B, model: &T5<B>, tensors: &mut BTreeMap<String, OwnedTensor>) -> Result<()> {
    let Some(scale) = model.lora.as_ref().map(|l| l.scale()) else { return Ok(()) };
    for (inp, part) in model.modules() {
        let Some(l) = &part.lora else { continue };
        let (a, b) = (be.download(&l.a)?, be.download(&l.b)?);
        let r = l.a.shape()[0];
        let name = format!("{}.weight", part.path);
        let t = tensors.get_mut(&name).ok_or_else(|| anyhow!("no weight {name} to merge the adapter into"))?;
        let mut w: Vec<f32> = bytemuck::pod_collect_to_vec(&t.bytes);
        for (o, row) in w.chunks_mut(inp).enumerate() {
            for k in 0..r {
                let bk = scale * b[o * r + k];
                row.iter_mut().zip(&a[k * inp..(k + 1) * inp]).for_each(|(x, ak)| *x += bk * ak);
            }
        }
        *t = OwnedTensor::from_f32(&w, &t.shape, DType::F32);
    }
    Ok(())
}

/// Saves the model as trained to `dest`; `src` is the directory it was loaded from.
pub fn save_model<B: Backend>(
    be: &B,
    model: &mut T5<B>,
    opt: &SftOptimizer<B>,
    src: &Path,
    tokenizer: &Path,
    dest: &Path,
) -> Result<()> {
    let mut tensors = match &opt.trainables {
        Trainables::Full { masters, .. } => named_tensors(be, model, &masters.iter().collect::<Vec<_>>())?,
        Trainables::Lora { .. } => {
            let base = read_masters(be, model, &Checkpoint::open_dir(src)?)?;
            let mut t = named_tensors(be, model, &base.iter().collect::<Vec<_>>())?;
            merge_adapters(be, model, &mut t)?;
            t
        }
    };
    if model.lm_head.is_none() {
        tensors.remove("lm_head.weight");
    }
    let name = dest.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let partial = parent.join(format!(".{name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    write_safetensors(&partial.join("model.safetensors"), &tensors, Some(meta))?;
    crate::fsutil::write_atomic(&partial.join("config.json"), &f32_config(src)?)?;
    crate::fsutil::copy_file(tokenizer, &partial.join("tokenizer.json"))?;
    if let Trainables::Lora { .. } = opt.trainables {
        let dir = partial.join("adapter");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        model.save_adapter(be, &dir, Some(&src.display().to_string()))?;
    }
    let old = parent.join(format!(".{name}.old"));
    if dest.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        std::fs::rename(dest, &old).with_context(|| format!("moving {} aside", dest.display()))?;
    }
    std::fs::rename(&partial, dest).with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}
