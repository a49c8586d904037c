//! Beam search as Hugging Face's `_beam_search` (transformers 5.17) runs it, with every step on the
//! device: each prompt's K beams are rows of one decoder batch; a step runs the decoder, the
//! processors on the log-softmax, `beam_step` (the best 2·K continuations, the new beams, the
//! finished hypotheses, whether the prompt is done) and the gather of the self-attention K/V
//! caches by the beams' sources. The step is recorded once as a CUDA graph and replayed; the host
//! only looks at the done flags now and then.

use super::generate::{GenConfig, Generation, Prompts, run_decoding};
use super::model::{DecodeCache, Fwd, T5};
use crate::backend::{Backend, BeamSpec, BeamState, Position, Prec, Shaped};
use anyhow::Result;

pub(super) fn beam_search<B: Backend>(
    be: &B,
    model: &T5<B>,
    prompts: &Prompts<B>,
    cfg: &GenConfig,
    f: Fwd,
    on_token: &mut dyn FnMut(usize),
) -> Result<Vec<Generation>> {
    let c = &model.config;
    let (b, k, t) = (prompts.ids.shape()[0], cfg.num_beams, cfg.max_new_tokens);
    let spec = BeamSpec {
        num_beams: k,
        length_penalty: cfg.length_penalty,
        early_stopping: cfg.early_stopping,
        max_new_tokens: t,
        eos: c.eos_token_id,
        pad: c.pad_token_id,
    };
    let process = cfg.process_spec(c.eos_token_id, c.decoder_start_token_id, true);
    let enc = model.encode(be, &prompts.ids, &prompts.lengths, f)?;
    // Row b·K + j is beam j of prompt b: every beam of a prompt reads its encoder states.
    let of_prompt: Vec<u32> = (0..b * k).map(|r| (r / k) as u32).collect();
    let lengths = be.download_ids(&prompts.lengths)?;
    let beam_lengths = be.upload_ids(&of_prompt.iter().map(|&p| lengths[p as usize]).collect::<Vec<_>>(), &[b * k])?;
    let rows = be.upload_ids(&of_prompt, &[b * k])?;
    let cache = model.start_decoding(be, &enc, &prompts.lengths, t, f)?;
    let mut cache = expand(be, cache, &rows, &beam_lengths)?;
    let state = std::cell::RefCell::new(BeamState::new(be, b, &spec, c.decoder_start_token_id)?);
    let mut step_counter = be.upload_ids(&[0], &[1])?;
    let mut step = || -> Result<()> {
        let st = &mut *state.borrow_mut();
        let hidden = model.decode(be, &st.next, &mut cache, f)?;
        let logits = model.lm_logits(be, &hidden)?;
        let at = Position::Counter(&step_counter);
        let processed = be.process_logits(&logits, &st.seqs, &process, at)?;
        be.beam_step(&logits, &processed, &spec, at, st)?;
        // The cache now holds this step's position too (`decode` advanced its counter).
        for (sk, sv) in cache.self_k.iter_mut().zip(cache.self_v.iter_mut()) {
            be.gather_beams(sk, &st.src, Position::Counter(&cache.pos))?;
            be.gather_beams(sv, &st.src, Position::Counter(&cache.pos))?;
        }
        be.advance(&mut step_counter, 1)
    };
    let all_done = || Ok(be.download_ids(&state.borrow().done)?.iter().all(|&x| x != 0));
    run_decoding(be, t, &mut step, &all_done, on_token)?;
    let st = state.into_inner();
    let (seqs, logprobs, lens) =
        (be.download_ids(&st.fin_seqs)?, be.download(&st.fin_logprobs)?, be.download_ids(&st.fin_lens)?);
    // Slot 0 of each prompt holds its best hypothesis; the last step finishes every prompt.
    Ok((0..b)
        .map(|p| {
            let r = p * k;
            let n = lens[r] as usize;
            Generation {
                tokens: seqs[r * t..r * t + n].to_vec(),
                logprobs: logprobs[r * t..r * t + n].to_vec(),
                values: Vec::new(),
            }
        })
        .collect())
}

/// A cache for the prompts' rows made into one for their beams' rows (`rows[i]` is row i's
/// prompt): cross-attention K/V copied, self-attention caches empty.
fn expand<'a, B: Backend>(
    be: &B,
    cache: DecodeCache<'_, B>,
    rows: &B::Ids,
    lengths: &'a B::Ids,
) -> Result<DecodeCache<'a, B>> {
    let n = rows.numel();
    let copy = |x: B::Tensor| -> Result<B::Tensor> {
        let s = x.shape().to_vec();
        let flat = be.reshape(x, &[s[0], s[1] * s[2]])?;
        be.reshape(be.gather_rows(&flat, rows)?, &[n, s[1], s[2]])
    };
    let empty = |x: &B::Tensor| be.zeros_as(&[n, x.shape()[1], x.shape()[2]], Prec::Half);
    Ok(DecodeCache {
        self_k: cache.self_k.iter().map(empty).collect::<Result<_>>()?,
        self_v: cache.self_v.iter().map(empty).collect::<Result<_>>()?,
        cross_kv: cache.cross_kv.into_iter().map(copy).collect::<Result<_>>()?,
        enc_lengths: lengths,
        pos: be.upload_ids(&[0], &[1])?,
        capacity: cache.capacity,
    })
}
