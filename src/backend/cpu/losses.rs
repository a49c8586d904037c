//! The CPU reference of chosen tokens' log-probabilities with entropy, cross-entropy and their
//! gradients, over one row's log-softmax.

use super::*;

/// In-place log-softmax of one row, in f32 with the max subtracted first.
pub fn log_softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
    let lse = max + sum.ln();
    row.iter_mut().for_each(|x| *x -= lse);
}

impl LossOps for Cpu {
    fn token_logprobs_impl(&self, logits: &Self::Tensor, tokens: &Self::Ids) -> Result<(Self::Tensor, Self::Tensor)> {
        let (n, v) = logits.rows_cols();
        let mut lp = Vec::with_capacity(n);
        let mut ent = Vec::with_capacity(n);
        for (row, &t) in logits.data.chunks(v).zip(&tokens.data) {
            ensure!((t as usize) < v, "token {t} is outside the vocabulary of {v}");
            let mut l = row.to_vec();
            log_softmax_row(&mut l);
            lp.push(l[t as usize]);
            ent.push(-l.iter().map(|x| x.exp() * x).sum::<f32>());
        }
        Ok((CpuTensor::new(lp, &[n])?, CpuTensor::new(ent, &[n])?))
    }

    fn token_logprobs_backward_impl(
        &self,
        logits: &Self::Tensor,
        tokens: &Self::Ids,
        dlogp: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let v = logits.rows_cols().1;
        let mut out = logits.data.clone();
        for ((row, &t), &g) in out.chunks_mut(v).zip(&tokens.data).zip(&dlogp.data) {
            log_softmax_row(row);
            row.iter_mut().for_each(|x| *x = -g * x.exp());
            row[t as usize] += g;
        }
        CpuTensor::new(out, &logits.shape)
    }

    fn cross_entropy_impl(
        &self,
        logits: &Self::Tensor,
        targets: &Self::Ids,
        weights: &Self::Tensor,
        smoothing: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (n, v) = logits.rows_cols();
        let mut loss = Vec::with_capacity(n);
        let mut grad = logits.data.clone();
        for ((row, &t), &w) in grad.chunks_mut(v).zip(&targets.data).zip(&weights.data) {
            ensure!((t as usize) < v, "target {t} is outside the vocabulary of {v}");
            let mean = row.iter().sum::<f32>() / v as f32;
            let (x_t, max) = (row[t as usize], row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            loss.push((1.0 - smoothing) * (lse - x_t) + smoothing * (lse - mean));
            let floor = smoothing / v as f32;
            row.iter_mut().for_each(|x| *x = w * ((*x - lse).exp() - floor));
            row[t as usize] -= w * (1.0 - smoothing);
        }
        Ok((CpuTensor::new(loss, &[n])?, CpuTensor::new(grad, &logits.shape)?))
    }
}
