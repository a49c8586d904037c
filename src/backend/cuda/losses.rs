//! The CUDA log-probabilities of kernels/losses.cu: chosen tokens' log-probabilities with entropy,
//! cross-entropy, and their gradients.

use super::*;

impl Cuda {
    /// The logits of one row per block: what the kernels need of them beyond the shared checks.
    pub(super) fn logit_rows(&self, logits: &CudaTensor, what: &str) -> Result<(usize, usize)> {
        let (n, v) = logits.rows_cols();
        ensure!(matches!(logits.buf, Buf::F32(_)), "{what} expects f32 logits");
        ensure!(v > 0 || n == 0, "{what}: empty vocabulary");
        ensure!(v < 1 << 31, "{what}: a vocabulary of {v} exceeds the kernels' int indices");
        Ok((n, v))
    }
}

impl LossOps for Cuda {
    fn token_logprobs_impl(&self, logits: &CudaTensor, tokens: &CudaIds) -> Result<(CudaTensor, CudaTensor)> {
        let (n, v) = self.logit_rows(logits, "token_logprobs")?;
        let lp = self.empty(&[n], Prec::F32)?;
        let ent = self.empty(&[n], Prec::F32)?;
        if n > 0 {
            self.gpu.launch(
                "token_logprobs_f32",
                blocks(n, LP_THREADS)?,
                &[&self.ptr_t(logits), &self.gpu.ptr(&tokens.buf), &self.ptr_t(&lp), &self.ptr_t(&ent), &(v as i32)],
            )?;
        }
        Ok((lp, ent))
    }

    fn token_logprobs_backward_impl(
        &self,
        logits: &CudaTensor,
        tokens: &CudaIds,
        dlogp: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (n, v) = self.logit_rows(logits, "token_logprobs_backward")?;
        ensure!(
            dlogp.numel() == n && matches!(dlogp.buf, Buf::F32(_)),
            "token_logprobs_backward: dlogp must hold {n} f32 values, has shape {:?}",
            dlogp.shape
        );
        let out = self.empty(&logits.shape, Prec::F32)?;
        if n > 0 {
            self.gpu.launch(
                "token_logprobs_backward_f32",
                blocks(n, LP_THREADS)?,
                &[&self.ptr_t(logits), &self.gpu.ptr(&tokens.buf), &self.ptr_t(dlogp), &self.ptr_t(&out), &(v as i32)],
            )?;
        }
        Ok(out)
    }

    fn cross_entropy_impl(
        &self,
        logits: &CudaTensor,
        targets: &CudaIds,
        weights: &CudaTensor,
        smoothing: f32,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let (n, v) = self.logit_rows(logits, "cross_entropy")?;
        ensure!(
            weights.numel() == n && matches!(weights.buf, Buf::F32(_)),
            "cross_entropy: weights must hold {n} f32 values, has shape {:?}",
            weights.shape
        );
        let loss = self.empty(&[n], Prec::F32)?;
        let grad = self.empty(&logits.shape, Prec::F32)?;
        if n > 0 {
            self.gpu.launch(
                "cross_entropy_f32",
                blocks(n, LP_THREADS)?,
                &[
                    &self.ptr_t(logits),
                    &self.gpu.ptr(&targets.buf),
                    &self.ptr_t(weights),
                    &self.ptr_t(&loss),
                    &self.ptr_t(&grad),
                    &(v as i32),
                    &smoothing,
                ],
            )?;
        }
        Ok((loss, grad))
    }
}
