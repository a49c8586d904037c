//! TRL 0.4.7 `core.py`'s per-token log-prob and entropy of a row of logits (with the log-prob's
//! gradient, the first step of the backward pass into the network): f64 oracles for the backend's
//! fused kernels and for the PPO arithmetic's tests.

/// `(max, log Σ exp(x − max))` of one row, in f64.
fn log_normaliser(row: &[f32]) -> (f64, f64) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    (max, sum.ln())
}

fn check_logits(logits: &[f32], vocab: usize, rows: usize) {
    assert!(vocab > 0, "vocabulary size must be positive");
    assert_eq!(logits.len(), rows * vocab, "logits are not [{rows}, {vocab}]");
}

/// `logprobs_from_logits(logits, labels)`: `log_softmax(logits)[label]` for each row of
/// `logits [N, vocab]` and its label `labels [N]`.
pub fn logprobs_from_logits(logits: &[f32], vocab: usize, labels: &[u32]) -> Vec<f32> {
    check_logits(logits, vocab, labels.len());
    logits
        .chunks_exact(vocab)
        .zip(labels)
        .map(|(row, &label)| {
            let (max, lse) = log_normaliser(row);
            (row[label as usize] as f64 - max - lse) as f32
        })
        .collect()
}

/// The gradient of `logprobs_from_logits` with respect to the logits, given the loss's gradient
/// `d_logprobs [N]` with respect to each log-prob: `d_logits[j] = d_logprob · (1[j = label] − softmax_j)`.
pub fn logprobs_from_logits_backward(logits: &[f32], vocab: usize, labels: &[u32], d_logprobs: &[f32]) -> Vec<f32> {
    check_logits(logits, vocab, labels.len());
    assert_eq!(d_logprobs.len(), labels.len(), "one gradient per label");
    let mut out = Vec::with_capacity(logits.len());
    for ((row, &label), &g) in logits.chunks_exact(vocab).zip(labels).zip(d_logprobs) {
        let (max, lse) = log_normaliser(row);
        out.extend(row.iter().enumerate().map(|(j, &x)| {
            let p = (x as f64 - max - lse).exp();
            let onehot = if j == label as usize { 1.0 } else { 0.0 };
            (g as f64 * (onehot - p)) as f32
        }));
    }
    out
}

/// `entropy_from_logits(logits)`: `logsumexp(x) − Σ softmax(x) · x` for each row of `logits [N, vocab]`.
pub fn entropy_from_logits(logits: &[f32], vocab: usize) -> Vec<f32> {
    check_logits(logits, vocab, logits.len() / vocab.max(1));
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let (max, lse) = log_normaliser(row);
            let mean_x: f64 = row.iter().map(|&x| (x as f64 - max - lse).exp() * x as f64).sum();
            (max + lse - mean_x) as f32
        })
        .collect()
}
