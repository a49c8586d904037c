//! The CPU reference of choosing the next token: Hugging Face's processor order, then a draw from
//! the counter RNG that the GPU reproduces.

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
            let tok = choose_token(raw, spec, streams.data[row] as u64, step as u64);
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
}
