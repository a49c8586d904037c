//! `detox bench beam`: beam-search generation (`t5::generate` with num_beams > 1) on random weights
//! of a FLAN-T5 shape; tools/bench_hf_beam.py times Hugging Face's `generate` with the same settings.

use super::{BeamArgs, Report, gib, median, random_prompts};
use crate::backend::Backend;
use crate::device::Job;
use crate::t5::{Fwd, GenConfig, Prompts, T5, generate};
use crate::text::pad_batch;
use anyhow::{Result, ensure};
use serde_json::json;
use std::time::Instant;

pub(super) struct BenchBeam(pub BeamArgs);

impl Job for BenchBeam {
    type Output = Report;

    fn run<B: Backend>(self, be: &B) -> Result<Report> {
        let a = self.0;
        let (dir, _tmp) = a.decode.model_dir()?;
        let model = T5::load(be, &dir)?;
        let c = model.config.clone();
        let (b, l, g) = (a.decode.batch, a.decode.src, a.decode.gen_tokens);
        let streams: Vec<u32> = (0..b as u32).collect();
        let prompts = Prompts::upload(be, &pad_batch(&random_prompts(b, l, c.eos_token_id), c.pad_token_id), &streams)?;
        // min_new_tokens = max_new_tokens: every call runs all its steps, as the HF script's does.
        let cfg = GenConfig { max_new_tokens: g, min_new_tokens: g, num_beams: a.num_beams, ..GenConfig::default() };
        let mut times = Vec::new();
        be.reset_peak_memory();
        for it in 0..=a.decode.iters {
            be.sync()?;
            let t0 = Instant::now();
            let out = generate(be, &model, None, &prompts, &cfg, Fwd::default())?;
            let dt = t0.elapsed().as_secs_f64();
            ensure!(out.iter().all(|o| o.tokens.len() == g), "every prompt should get {g} tokens");
            if it > 0 {
                times.push(dt);
            }
        }
        let t = median(times);
        let tok_s = (b * g) as f64 / t;
        let name = a.decode.model_name();
        let peak = be.peak_memory();
        let text = format!(
            "beam search: batch {b}, src {l}, gen {g}, num_beams {}, {name}, {}\n\
             generate     {:9.2} ms per call, median of {}  →  {:.0} tokens/s of best hypotheses ({:.0} beam tokens/s)\n\
             peak memory  {}",
            a.num_beams,
            be.name(),
            t * 1e3,
            a.decode.iters,
            tok_s,
            tok_s * a.num_beams as f64,
            gib(peak),
        );
        let json = json!({
            "phase": "beam", "device": be.name(), "model": name, "batch": b, "src": l, "gen": g,
            "num_beams": a.num_beams, "iters": a.decode.iters, "call_s": t, "tokens_per_s": tok_s, "peak_bytes": peak,
        });
        Ok(Report { text, json })
    }
}
