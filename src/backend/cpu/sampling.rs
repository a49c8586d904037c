//! The CPU reference of choosing the next token: Hugging Face's logits processors, greedy choice or
//! a draw from the counter RNG that the GPU reproduces, and beam search's step and cache gather.

use super::*;

/// Picks one token from one row of raw logits. Sampling draws u from the counter RNG keyed by
/// (seed, row, step) and inverts the CDF of the filtered distribution in vocabulary order, which
/// the GPU reproduces with a prefix sum.
pub fn choose_token(raw: &[f32], spec: &SampleSpec, row: u64, step: u64) -> usize {
    let mut z: Vec<f32> = raw.to_vec();
    if (step as usize) < spec.min_new_tokens {
        z[spec.eos as usize] = f32::NEG_INFINITY;
    }
    if spec.greedy {
        return argmax(&z);
    }
    let t = spec.temperature;
    z.iter_mut().for_each(|x| *x /= t);
    if spec.top_k > 0 && spec.top_k < z.len() {
        let mut sorted = z.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[spec.top_k - 1];
        z.iter_mut().filter(|x| **x < kth).for_each(|x| *x = f32::NEG_INFINITY);
    }
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = z.iter().map(|x| (x - max).exp()).collect();
    // Sums in f64: over 32k terms an f32 running sum drifts by a sizeable part of one token's
    // probability, and the GPU, which sums in another order, would then draw other tokens.
    if spec.top_p < 1.0 {
        // Keep the most likely tokens until their mass reaches top_p, as Hugging Face does, and
        // every token tied with the last one kept (a sort would break ties arbitrarily).
        let total: f64 = p.iter().map(|&x| x as f64).sum();
        let mut sorted = p.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let need = spec.top_p as f64 * total;
        let mut cum = 0.0f64;
        let mut threshold = sorted[0];
        for &v in &sorted {
            cum += v as f64;
            threshold = v;
            if cum >= need {
                break;
            }
        }
        p.iter_mut().filter(|x| **x < threshold).for_each(|x| *x = 0.0);
    }
    let total: f64 = p.iter().map(|&x| x as f64).sum();
    let u = uniform(spec.seed, row, step) as f64 * total;
    let mut cum = 0.0f64;
    let mut last_nonzero = 0;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            cum += pi as f64;
            last_nonzero = i;
            if cum > u {
                return i;
            }
        }
    }
    last_nonzero
}

/// The first index of the largest value (torch.argmax's tie rule).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

impl SamplingOps for Cpu {
    fn select_tokens_impl(
        &self,
        logits: &Self::Tensor,
        processed: Option<&Self::Tensor>,
        spec: &SampleSpec,
        step: Position<'_, Self>,
        streams: &Self::Ids,
        finished: &mut Self::Ids,
        tokens: &mut Self::Ids,
        logprobs: &mut Self::Tensor,
    ) -> Result<()> {
        let (b, v) = logits.rows_cols();
        let step = at(step);
        for row in 0..b {
            if finished.data[row] != 0 {
                tokens.data[row] = spec.pad;
                logprobs.data[row] = 0.0;
                continue;
            }
            let raw = &logits.data[row * v..(row + 1) * v];
            let scores = processed.map_or(raw, |p| &p.data[row * v..(row + 1) * v]);
            let tok = choose_token(scores, spec, streams.data[row] as u64, step as u64);
            let mut lp = raw.to_vec();
            log_softmax_row(&mut lp);
            tokens.data[row] = tok as u32;
            logprobs.data[row] = lp[tok];
            if tok as u32 == spec.eos {
                finished.data[row] = 1;
            }
        }
        Ok(())
    }

    fn process_logits_impl(
        &self,
        logits: &Self::Tensor,
        history: &Self::Ids,
        spec: &ProcessSpec,
        step: Position<'_, Self>,
    ) -> Result<Self::Tensor> {
        let v = logits.rows_cols().1;
        let (step, t) = (at(step), history.shape[1]);
        ensure!(step <= t, "process_logits: step {step} past the {t} tokens of the history");
        let mut out = logits.data.clone();
        for (row, scores) in out.chunks_mut(v).enumerate() {
            let ids: Vec<u32> = std::iter::once(spec.decoder_start)
                .chain(history.data[row * t..row * t + step].iter().copied())
                .collect();
            process_row(scores, &ids, spec);
        }
        CpuTensor::new(out, &logits.shape)
    }

    fn beam_step_impl(
        &self,
        logits: &Self::Tensor,
        processed: &Self::Tensor,
        spec: &BeamSpec,
        step: Position<'_, Self>,
        st: &mut BeamState<Self>,
    ) -> Result<()> {
        let (n, v) = logits.rows_cols();
        let (k, t, cur) = (spec.num_beams, spec.max_new_tokens, at(step));
        ensure!(cur < t, "beam_step: step {cur} past max_new_tokens {t}");
        let old = (st.seqs.data.clone(), st.logprobs.data.clone());
        let old_fin = (st.fin_seqs.data.clone(), st.fin_logprobs.data.clone(), st.fin_scores.data.clone());
        let old_lens = st.fin_lens.data.clone();
        for item in 0..n / k {
            let rows = item * k..(item + 1) * k;
            if st.done.data[item] != 0 {
                for r in rows {
                    st.src.data[r] = r as u32;
                    st.next.data[r] = spec.pad;
                }
                continue;
            }
            let cands =
                best_candidates(&processed.data[rows.start * v..rows.end * v], &st.scores.data[rows.clone()], v, 2 * k);
            let last = cur + 1 == t;
            let hit = |c: &(f32, usize)| last || (c.1 % v) as u32 == spec.eos;
            // A candidate's row, token, and log-probability under the unprocessed distribution.
            let parts = |c: &(f32, usize)| {
                let (r, tok) = (rows.start + c.1 / v, c.1 % v);
                let mut lp = logits.data[r * v..(r + 1) * v].to_vec();
                log_softmax_row(&mut lp);
                (r, tok as u32, lp[tok])
            };
            // The new running beams: the best K candidates that do not finish (Hugging Face ranks
            // finishing ones last; only the last step has fewer than K others).
            let running: Vec<&(f32, usize)> =
                cands.iter().filter(|c| !hit(c)).chain(cands.iter().filter(|c| hit(c))).take(k).collect();
            for (i, c) in running.iter().enumerate() {
                let (src, tok, lp) = parts(c);
                let r = rows.start + i;
                st.seqs.data[r * t..r * t + cur].copy_from_slice(&old.0[src * t..src * t + cur]);
                st.seqs.data[r * t + cur] = tok;
                st.logprobs.data[r * t..r * t + cur].copy_from_slice(&old.1[src * t..src * t + cur]);
                st.logprobs.data[r * t + cur] = lp;
                st.scores.data[r] = c.0;
                st.src.data[r] = src as u32;
                st.next.data[r] = tok;
            }
            // Finished hypotheses: the item's so far, then those of the first K candidates that
            // finish, scored with the length penalty; the best K stay, earlier ones first on ties.
            enum From {
                Old(usize),
                New(usize),
            }
            let mut pool: Vec<(f32, From)> =
                rows.clone().filter(|&r| old_lens[r] > 0).map(|r| (old_fin.2[r], From::Old(r))).collect();
            let pen = spec.penalty(cur + 1);
            pool.extend(cands[..k].iter().enumerate().filter(|(_, c)| hit(c)).map(|(j, c)| (c.0 / pen, From::New(j))));
            pool.sort_by(|a, b| b.0.total_cmp(&a.0));
            for j in 0..k {
                let r = rows.start + j;
                match pool.get(j) {
                    Some((score, From::Old(f))) => {
                        let f = *f;
                        st.fin_seqs.data[r * t..(r + 1) * t].copy_from_slice(&old_fin.0[f * t..(f + 1) * t]);
                        st.fin_logprobs.data[r * t..(r + 1) * t].copy_from_slice(&old_fin.1[f * t..(f + 1) * t]);
                        st.fin_scores.data[r] = *score;
                        st.fin_lens.data[r] = old_lens[f];
                    }
                    Some((score, From::New(c))) => {
                        let (src, tok, lp) = parts(&cands[*c]);
                        st.fin_seqs.data[r * t..r * t + cur].copy_from_slice(&old.0[src * t..src * t + cur]);
                        st.fin_seqs.data[r * t + cur] = tok;
                        st.fin_logprobs.data[r * t..r * t + cur].copy_from_slice(&old.1[src * t..src * t + cur]);
                        st.fin_logprobs.data[r * t + cur] = lp;
                        st.fin_scores.data[r] = *score;
                        st.fin_lens.data[r] = cur as u32 + 1;
                    }
                    None => st.fin_lens.data[r] = 0,
                }
            }
            if pool.len() >= k {
                let worst = st.fin_scores.data[rows.end - 1];
                let best_len = match spec.early_stopping {
                    EarlyStopping::Never if spec.length_penalty > 0.0 => t,
                    _ => cur + 1,
                };
                let best_possible = st.scores.data[rows.start] / spec.penalty(best_len);
                if spec.early_stopping == EarlyStopping::True || best_possible <= worst {
                    st.done.data[item] = 1;
                }
            }
        }
        Ok(())
    }

    fn gather_beams_impl(&self, x: &mut Self::Tensor, src: &Self::Ids, upto: Position<'_, Self>) -> Result<()> {
        let (cap, d) = (x.shape[1], x.shape[2]);
        let upto = at(upto);
        ensure!(upto <= cap, "gather_beams: {upto} rows of a cache of {cap}");
        let old = x.data.clone();
        for (i, &s) in src.data.iter().enumerate() {
            let s = s as usize;
            ensure!(s < x.shape[0], "gather_beams: source row {s} of {}", x.shape[0]);
            x.data[i * cap * d..(i * cap + upto) * d].copy_from_slice(&old[s * cap * d..(s * cap + upto) * d]);
        }
        Ok(())
    }
}

/// Hugging Face's processors on one row of scores (made log-probabilities first when asked), for
/// the decoder ids `ids` so far (the start token first).
pub fn process_row(scores: &mut [f32], ids: &[u32], spec: &ProcessSpec) {
    if spec.log_softmax {
        log_softmax_row(scores);
    }
    let base = scores.to_vec();
    if spec.repetition_penalty != 1.0 {
        let p = spec.repetition_penalty;
        for &id in ids {
            let s = base[id as usize];
            scores[id as usize] = if s < 0.0 { s * p } else { s / p };
        }
    }
    let n = spec.no_repeat_ngram_size;
    if n > 0 && ids.len() >= n {
        // A window whose first n − 1 ids are the last n − 1 bans its own last id.
        let prefix = &ids[ids.len() + 1 - n..];
        for w in ids.windows(n) {
            if &w[..n - 1] == prefix {
                scores[w[n - 1] as usize] = f32::NEG_INFINITY;
            }
        }
    }
    if ids.len() - 1 < spec.min_new_tokens {
        scores[spec.eos as usize] = f32::NEG_INFINITY;
    }
}

/// The `m` best of the candidates `scores[k] + processed[k, t]` over a batch item's beams k and
/// tokens t, as (score, k·V + t), best first; ties go to the lower index (as the GPU's selection).
fn best_candidates(processed: &[f32], scores: &[f32], v: usize, m: usize) -> Vec<(f32, usize)> {
    let mut all: Vec<(f32, usize)> = processed.iter().enumerate().map(|(f, &p)| (p + scores[f / v], f)).collect();
    let order = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    all.select_nth_unstable_by(m - 1, order);
    all.truncate(m);
    all.sort_by(order);
    all
}
