//! TRL 0.4.7 `core.py`'s masked tensor helpers that the PPO arithmetic is built from: masked mean,
//! variance and whitening. (The per-token log-prob and entropy helpers are test oracles, in
//! tests/oracles/trl_core.rs: the engine computes them on the backend.)
//!
//! Sums run in f64 and are rounded once to f32 before the division, so a result is within an ulp or
//! two of PyTorch's f32 reductions whatever the order PyTorch sums in.

use super::on;

fn masked_sum(values: &[f32], mask: &[f32]) -> (f64, usize) {
    assert_eq!(values.len(), mask.len(), "values and mask differ in length");
    values.iter().zip(mask).filter(|(_, m)| on(**m)).fold((0.0, 0), |(s, n), (v, _)| (s + *v as f64, n + 1))
}

/// `masked_mean(values, mask)`: `(values · mask).sum() / mask.sum()`. NaN when nothing is masked in,
/// as in TRL.
pub fn masked_mean(values: &[f32], mask: &[f32]) -> f32 {
    let (sum, n) = masked_sum(values, mask);
    sum as f32 / n as f32
}

/// `masked_var(values, mask, unbiased)`: the masked mean of the squared deviations from the masked
/// mean, times `n / (n − 1)` (computed in f32, as TRL's integer mask sums divide) when unbiased.
/// With one masked-in element the unbiased variance is NaN, as in TRL.
pub fn masked_var(values: &[f32], mask: &[f32], unbiased: bool) -> f32 {
    let mean = masked_mean(values, mask);
    let (sq, n) = values
        .iter()
        .zip(mask)
        .filter(|(_, m)| on(**m))
        .fold((0.0f64, 0usize), |(s, n), (v, _)| ((s + ((v - mean) * (v - mean)) as f64), n + 1));
    let var = sq as f32 / n as f32;
    if unbiased { var * (n as f32 / (n as f32 - 1.0)) } else { var }
}

/// `masked_whiten(values, mask, shift_mean)`: `(values − μ) · rsqrt(σ² + 1e-8)` over EVERY element,
/// with μ the masked mean and σ² the unbiased masked variance; `shift_mean = false` adds μ back.
pub fn masked_whiten(values: &[f32], mask: &[f32], shift_mean: bool) -> Vec<f32> {
    let mean = masked_mean(values, mask);
    let var = masked_var(values, mask, true);
    let rstd = 1.0 / (var + 1e-8).sqrt();
    values.iter().map(|v| if shift_mean { (v - mean) * rstd } else { (v - mean) * rstd + mean }).collect()
}
