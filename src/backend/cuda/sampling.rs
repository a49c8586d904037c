//! The CUDA choice of the next token (kernels/sampling.cu).

use super::*;

/// Mirrors `SampleParams` in kernels/sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SampleParams {
    streams: u64,
    finished: u64,
    tokens: u64,
    logprobs: u64,
    step_counter: u64,
    seed: u64,
    v: i32,
    greedy: i32,
    top_k: i32,
    min_new_tokens: i32,
    step: i32,
    temperature: f32,
    top_p: f32,
    eos: u32,
    pad: u32,
    suppress_eos: i32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for SampleParams {}

impl SamplingOps for Cuda {
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
        let (Buf::F32(_), Buf::F32(_)) = (&logits.buf, &logprobs.buf) else {
            bail!("select_tokens expects f32 logits and log-probs")
        };
        let (step, step_counter) = self.position(step);
        let params = SampleParams {
            streams: self.gpu.ptr(&streams.buf),
            finished: self.gpu.ptr(&finished.buf),
            tokens: self.gpu.ptr(&tokens.buf),
            logprobs: self.ptr_t(logprobs),
            step_counter,
            seed: spec.seed,
            v: v as i32,
            greedy: spec.greedy as i32,
            top_k: spec.top_k.min(i32::MAX as usize) as i32,
            min_new_tokens: spec.min_new_tokens.min(i32::MAX as usize) as i32,
            step,
            temperature: spec.temperature,
            top_p: spec.top_p,
            eos: spec.eos,
            pad: spec.pad,
            suppress_eos: 0,
        };
        let cfg = LaunchConfig { grid_dim: (b as u32, 1, 1), block_dim: (VOCAB_THREADS, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch("select_tokens", cfg, &[&self.ptr_t(logits), &params])
    }
}
