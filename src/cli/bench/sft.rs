//! `detox bench sft`: full-parameter supervised fine-tuning steps on random weights of a FLAN-T5
//! shape, prompts and targets of fixed lengths, timed as the gradients (`sft_gradients`: forward,
//! loss, backward) and the update (`sft_update`: clipping, the optimiser, the weights refreshed),
//! the two halves of `detox sft`'s `sft_step`, beside the bf16 ceiling.

use super::{PEAK_FLOPS, Report, SftArgs, gib, median, random_model_dir, random_prompts};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::device::Job;
use crate::sft::data::{Pair, SftBatch};
use crate::sft::settings::{OptimSettings, Optimizer};
use crate::sft::step::{SftOptimizer, sft_gradients, sft_update};
use crate::t5::T5;
use crate::t5::config::T5Config;
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

pub(super) struct BenchSft(pub SftArgs);

impl Job for BenchSft {
    type Output = Report;

    fn run<B: Backend>(self, be: &B) -> Result<Report> {
        let a = self.0;
        let tmp = random_model_dir(&a.size)?;
        let mut model = T5::load(be, tmp.path())?;
        let optim = OptimSettings { optimizer: a.optimizer, label_smoothing: 0.1, ..OptimSettings::default() };
        let mut opt = SftOptimizer::full(be, &model, &Checkpoint::open_dir(tmp.path())?, optim.kind())?;
        let c = model.config.clone();
        let targets = random_prompts(a.batch, a.tgt, c.eos_token_id);
        let pairs: Vec<Pair> = random_prompts(a.batch, a.src, c.eos_token_id)
            .into_iter()
            .zip(targets)
            .map(|(source, target)| Pair { source, target })
            .collect();
        let refs: Vec<&Pair> = pairs.iter().collect();
        let batch = SftBatch::new(&refs, c.decoder_start_token_id, c.pad_token_id);
        let tokens = batch.tokens();

        let (mut grads_s, mut update_s) = (Vec::new(), Vec::new());
        be.reset_peak_memory();
        for it in 0..=a.iters {
            let h = optim.hyper(optim.learning_rate, be.default_loss_scale(), it as u64);
            let profiled = a.profile && it == a.iters;
            if profiled {
                be.profiler_range(true)?;
            }
            be.sync()?;
            let t0 = Instant::now();
            let (_, mut grads) = sft_gradients(be, &model, true, &batch, tokens, &h)?;
            be.sync()?;
            let t1 = Instant::now();
            sft_update(be, &mut model, &mut opt, &mut grads, &h)?;
            be.sync()?;
            let t2 = Instant::now();
            if profiled {
                be.profiler_range(false)?;
            }
            if it > 0 {
                grads_s.push((t1 - t0).as_secs_f64());
                update_s.push((t2 - t1).as_secs_f64());
            }
        }
        Ok(report(be, &a, &c, median(grads_s), median(update_s)))
    }
}

/// The products' FLOPs of one step: every weight once per token that passes it, the LM head over
/// the targets, attention's score and context products; 2 FLOPs a multiply-add, and the backward's
/// two products per forward one. Embeddings and elementwise work are left out.
fn step_flops(c: &T5Config, b: usize, src: usize, tgt: usize) -> f64 {
    let (d, inner, ff, v) = (c.d_model as f64, c.inner_dim() as f64, c.d_ff as f64, c.vocab_size as f64);
    let (le, ld) = (c.num_layers as f64, c.num_decoder_layers as f64);
    let (b, l, t) = (b as f64, src as f64, tgt as f64);
    let enc = b * l * le * (4.0 * d * inner + 3.0 * d * ff) + le * b * 2.0 * l * l * inner;
    // Cross-attention's K and V are products of the encoder's output, once per prompt token.
    let dec = b * t * ld * (6.0 * d * inner + 3.0 * d * ff)
        + b * l * ld * 2.0 * d * inner
        + b * t * d * v
        + ld * b * 2.0 * (t * t + t * l) * inner;
    6.0 * (enc + dec)
}

fn report<B: Backend>(be: &B, a: &SftArgs, c: &T5Config, grads: f64, update: f64) -> Report {
    let step = grads + update;
    let flops = step_flops(c, a.batch, a.src, a.tgt);
    let tokens = (a.batch * (a.src + a.tgt)) as f64;
    let ceiling = flops / PEAK_FLOPS;
    let peak = be.peak_memory();
    let optimizer = match a.optimizer {
        Optimizer::Adamw => "adamw",
        Optimizer::Adafactor => "adafactor",
    };
    let text = format!(
        "sft: batch {}, src {}, tgt {}, random flan-t5-{}, every weight, {optimizer}, {}\n\
         step         {:9.2} ms median of {}  →  {:.0} tokens/s (prompt and target)\n\
         gradients    {:9.2} ms  {:6.1} TFLOP/s\n\
         update       {:9.2} ms\n\
         ceiling      {:9.2} ms  ({:.1} TFLOP of products at 790 TFLOP/s): the step runs at {:.1}% of it\n\
         peak memory  {}",
        a.batch,
        a.src,
        a.tgt,
        a.size,
        be.name(),
        step * 1e3,
        a.iters,
        tokens / step,
        grads * 1e3,
        flops / grads / 1e12,
        update * 1e3,
        ceiling * 1e3,
        flops / 1e12,
        100.0 * ceiling / step,
        gib(peak),
    );
    let json = json!({
        "phase": "sft", "device": be.name(), "size": a.size, "batch": a.batch, "src": a.src, "tgt": a.tgt,
        "optimizer": optimizer, "iters": a.iters, "step_s": step, "gradients_s": grads, "update_s": update,
        "tokens_per_s": tokens / step, "flops": flops, "ceiling_s": ceiling, "ceiling_fraction": ceiling / step,
        "peak_bytes": peak,
    });
    Report { text, json }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count by hand for one layer each, d 2, inner 2, ff 3, vocab 5, batch 1, 2 prompt
    /// tokens and 1 target token, in multiply-adds.
    #[test]
    fn step_flops_counts_every_product() {
        let c = T5Config {
            d_model: 2,
            d_kv: 1,
            num_heads: 2,
            d_ff: 3,
            vocab_size: 5,
            num_layers: 1,
            num_decoder_layers: 1,
            ..T5Config::preset("tiny").unwrap()
        };
        // Encoder: 2 tokens × (4·2·2 + 3·2·3) = 68, attention 2·2²·2 = 16. Decoder: 1 token ×
        // (6·2·2 + 3·2·3) = 42, cross K/V 2 tokens × 2·2·2 = 16, head 2·5 = 10, attention
        // 2·(1 + 2)·2 = 12.
        let macs = 68.0 + 16.0 + 42.0 + 16.0 + 10.0 + 12.0;
        assert_eq!(step_flops(&c, 1, 2, 1), 2.0 * 3.0 * macs);
    }
}
