//! The phases of one PPO iteration around `ppo_step`, as `detox train` runs them and `detox bench
//! ppo` times them: the rollout (the policy samples a response to each prompt) and the reward (each
//! response scored). Data-parallel workers each take their share of the rows; the results are
//! gathered back in row order on every worker.

use super::settings::{RewardKind, RewardSettings};
use crate::backend::Backend;
use crate::classifier::Classifier;
use crate::parallel::{Collective, gather_concat, gather_tokens, shard};
use crate::t5::generate::generate_reporting;
use crate::t5::model::Fwd;
use crate::t5::{GenConfig, Prompts, T5};
use crate::text::pad_batch;
use anyhow::Result;
use rayon::prelude::*;

/// Samples one response per prompt with the policy's adapters merged (they are fixed until the
/// optimisation), each row's sampling keyed by `cfg.seed` and its prompt's `streams` entry (its
/// index in the data set), so that a prompt's sample does not depend on which worker draws it.
pub fn rollout<B: Backend>(
    be: &B,
    group: &dyn Collective<B>,
    model: &mut T5<B>,
    (prompts, streams): (&[Vec<u32>], &[u32]),
    cfg: &GenConfig,
    on_token: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    let part = shard(prompts.len(), group.rank(), group.world());
    model.merge_lora(be)?;
    let batch = Prompts::upload(be, &pad_batch(&prompts[part.clone()], model.config.pad_token_id), &streams[part])?;
    let out = generate_reporting(be, model, None, &batch, cfg, Fwd::eval(true), on_token);
    model.unmerge_lora();
    let mine: Vec<Vec<u32>> = out?.into_iter().map(|g| g.tokens).collect();
    gather_tokens(group, be, &mine)
}

/// Where rewards come from: the reward settings, and for `RewardKind::Classifier` the classifier
/// with the index of its reward label and the policy tokenizer's decoding of a response.
pub struct RewardModel<'a, B: Backend> {
    pub settings: &'a RewardSettings,
    pub classifier: Option<(&'a Classifier<B>, usize)>,
    /// Called from several threads at once: the rollout's responses are decoded in parallel.
    pub decode: &'a (dyn Fn(&[u32]) -> Result<String> + Sync),
}

/// Each response's reward, and the classifier's probability of the reward label (0 for the toy
/// reward). `on_scored(done, total)` follows this worker's classifier batches.
pub fn reward<B: Backend>(
    be: &B,
    group: &dyn Collective<B>,
    rm: &RewardModel<'_, B>,
    responses: &[Vec<u32>],
    on_scored: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let r = rm.settings;
    let mine = &responses[shard(responses.len(), group.rank(), group.world())];
    let (scores, toxicity): (Vec<f32>, Vec<f32>) = match (r.kind, rm.classifier) {
        (RewardKind::Classifier, Some((clf, label))) => {
            let texts: Vec<String> = mine.par_iter().map(|t| (rm.decode)(t)).collect::<Result<_>>()?;
            let mut scored = 0;
            let logits = clf.logits(be, &texts, r.batch_size, |n| {
                scored += n;
                on_scored(scored, texts.len());
            })?;
            (
                logits.iter().map(|l| r.transform.apply(l[label])).collect(),
                logits.iter().map(|l| crate::classifier::sigmoid(l[label])).collect(),
            )
        }
        (RewardKind::Classifier, None) => anyhow::bail!("the classifier reward needs a classifier"),
        (RewardKind::TokenShare, _) => (
            mine.iter()
                .map(|t| t.iter().filter(|&&x| x < r.token_below).count() as f32 / t.len().max(1) as f32)
                .collect(),
            vec![0.0; mine.len()],
        ),
    };
    Ok((gather_concat(group, be, &scores)?, gather_concat(group, be, &toxicity)?))
}
