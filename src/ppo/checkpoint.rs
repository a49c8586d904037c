//! Training checkpoints, each a directory written whole before it gets its name: the adapter in
//! PEFT's format (so peft and `detox summarize --adapter` load it), the value head, Adam's moments,
//! and the trainer's state (step, KL controller, settings). `latest` names the newest.

use super::KlController;
use super::policy::Policy;
use super::settings::TrainSettings;
use super::step::Optimizer;
use super::trainables::{trainable_names, trainable_tensors};
use crate::backend::{Backend, Shaped};
use crate::checkpoint::{Checkpoint, DType, OwnedTensor, write_safetensors};
use crate::t5::{ValueHead, value_head};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const LATEST: &str = "latest";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// PPO steps completed.
    pub step: usize,
    pub kl: KlController,
    pub optimizer_steps: u64,
    pub settings: TrainSettings,
}

/// Writes `out/checkpoint-{step}` and points `out/latest` at it; returns the directory.
pub fn save<B: Backend>(
    be: &B,
    out: &Path,
    policy: &Policy<B>,
    opt: &Optimizer<B>,
    state: &TrainerState,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{:05}", state.step);
    let dest = out.join(&name);
    let partial = out.join(format!(".{name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let base = state.settings.model.path.display().to_string();
    policy.model.save_adapter(be, &partial, Some(&base))?;
    policy.value_head.save(be, &partial.join(value_head::FILE))?;
    let mut tensors = BTreeMap::new();
    for (name, (m, v)) in trainable_names(policy).into_iter().zip(&opt.moments) {
        tensors.insert(format!("exp_avg.{name}"), OwnedTensor::from_f32(&be.download(m)?, m.shape(), DType::F32));
        tensors.insert(format!("exp_avg_sq.{name}"), OwnedTensor::from_f32(&be.download(v)?, v.shape(), DType::F32));
    }
    write_safetensors(&partial.join(OPTIMIZER), &tensors, None)?;
    crate::fsutil::write_atomic(&partial.join(STATE), serde_json::to_string_pretty(state)?.as_bytes())?;
    // Replacing checkpoint-N: the old one is moved aside, not deleted, until the new one has its
    // name. A kill at any point leaves a complete checkpoint that `resolve` finds.
    let old = out.join(format!(".{name}.old"));
    if dest.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        std::fs::rename(&dest, &old).with_context(|| format!("moving {} aside", dest.display()))?;
        crate::fsutil::kill_point("checkpoint-swap");
    }
    std::fs::rename(&partial, &dest)
        .with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
    crate::fsutil::write_atomic(&out.join(LATEST), name.as_bytes())?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(dest)
}

/// A checkpoint directory, or a run directory whose `latest` names one.
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let latest = dir.join(LATEST);
    if latest.is_file() {
        let name = crate::fsutil::read_text(&latest)?;
        let d = dir.join(name.trim());
        if !d.join(STATE).is_file() {
            recover(dir, name.trim())?;
        }
        ensure!(d.join(STATE).is_file(), "{} names {}, which holds no {STATE}", latest.display(), d.display());
        return Ok(d);
    }
    bail!("{} is neither a checkpoint (no {STATE}) nor a run directory (no {LATEST})", dir.display())
}

/// Finishes a save of `dir/name` that a kill stopped between moving the old checkpoint aside and
/// naming the new one: the new one (complete: its state is written last) takes the name, or else
/// the old one gets it back.
fn recover(dir: &Path, name: &str) -> Result<()> {
    let d = dir.join(name);
    for candidate in [dir.join(format!(".{name}.partial")), dir.join(format!(".{name}.old"))] {
        if candidate.join(STATE).is_file() && !d.exists() {
            std::fs::rename(&candidate, &d)
                .with_context(|| format!("recovering {} from {}", d.display(), candidate.display()))?;
            eprintln!("recovered {} from {} (a save was interrupted)", d.display(), candidate.display());
            return Ok(());
        }
    }
    Ok(())
}

/// Removes `out`'s checkpoints of steps after `step`: a run resumed from an older checkpoint
/// discards the later ones, as it cuts the log back, so the directory holds one history.
pub fn discard_after(out: &Path, step: usize) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(gone) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let later = name.strip_prefix("checkpoint-").and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n > step);
        if later && e.path().join(STATE).is_file() {
            std::fs::remove_dir_all(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            gone.push(name);
        }
    }
    gone.sort();
    Ok(gone)
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE);
    let text = crate::fsutil::read_text(&p)?;
    let bad = || format!("{} is not a detox trainer state", p.display());
    let mut v: serde_json::Value = serde_json::from_str(&text).with_context(bad)?;
    // Checkpoints written before `[ppo] seed` was removed carry it; it never seeded anything, so
    // dropping it resumes them unchanged.
    if let Some(ppo) = v.pointer_mut("/settings/ppo").and_then(|x| x.as_object_mut()) {
        ppo.remove("seed");
    }
    serde_json::from_value(v).with_context(bad)
}

/// Loads a checkpoint's adapter, value head and optimiser moments into `policy` and `opt`.
pub fn load<B: Backend>(be: &B, dir: &Path, policy: &mut Policy<B>, opt: &mut Optimizer<B>) -> Result<TrainerState> {
    let state = read_state(dir)?;
    policy.model.load_adapter(be, dir)?;
    policy.value_head = ValueHead::load(be, &dir.join(value_head::FILE), policy.model.config.d_model)?;
    let file = Checkpoint::open_file(&dir.join(OPTIMIZER))?;
    let order: Vec<(String, Vec<usize>)> =
        trainable_tensors(policy).into_iter().map(|(name, t)| (name, t.shape().to_vec())).collect();
    ensure!(order.len() == opt.moments.len(), "{}: the optimiser state does not match the adapter", dir.display());
    for ((name, shape), (m, v)) in order.iter().zip(opt.moments.iter_mut()) {
        *m = be.upload(&file.get_shaped(&format!("exp_avg.{name}"), shape)?.to_f32(), shape)?;
        *v = be.upload(&file.get_shaped(&format!("exp_avg_sq.{name}"), shape)?.to_f32(), shape)?;
    }
    opt.steps = state.optimizer_steps;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ppo::PpoConfig;

    #[test]
    fn a_state_written_with_the_removed_ppo_seed_still_reads() {
        let settings = TrainSettings::default();
        let state = TrainerState {
            step: 3,
            kl: KlController::from_config(&PpoConfig::default()),
            optimizer_steps: 12,
            settings: settings.clone(),
        };
        let mut v = serde_json::to_value(&state).unwrap();
        v["settings"]["ppo"]["seed"] = serde_json::json!(0);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(STATE), v.to_string()).unwrap();
        let back = read_state(d.path()).unwrap();
        assert_eq!((back.step, back.optimizer_steps), (3, 12));
        assert_eq!(back.settings, settings);
        v["settings"]["ppo"]["sede"] = serde_json::json!(0);
        std::fs::write(d.path().join(STATE), v.to_string()).unwrap();
        let e = format!("{:#}", read_state(d.path()).unwrap_err());
        assert!(e.contains("trainer_state.json") && e.contains("sede"), "{e}");
    }
}
