//! The CUDA choice of the next token (kernels/sampling.cu): processors, greedy or sampled choice,
//! beam search's step and the gather of the KV caches by beam.

use super::*;

/// Mirrors `SampleParams` in kernels/sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SampleParams {
    choice: u64,
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
        processed: Option<&Self::Tensor>,
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
        let choice = match processed {
            Some(t) => self.f32_ptr(t, "select_tokens' processed scores")?,
            None => 0,
        };
        let params = SampleParams {
            choice,
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

    fn process_logits_impl(
        &self,
        logits: &Self::Tensor,
        history: &Self::Ids,
        spec: &ProcessSpec,
        step: Position<'_, Self>,
    ) -> Result<Self::Tensor> {
        let (n, v) = logits.rows_cols();
        let out = self.empty(&logits.shape, Prec::F32)?;
        let (step, step_counter) = self.position(step);
        let params = ProcessParams {
            logits: self.f32_ptr(logits, "process_logits' logits")?,
            out: self.ptr_t(&out),
            history: self.gpu.ptr(&history.buf),
            step_counter,
            v: v as i32,
            t: history.shape[1] as i32,
            step,
            log_softmax: spec.log_softmax as i32,
            ngram: spec.no_repeat_ngram_size.min(i32::MAX as usize) as i32,
            min_new: spec.min_new_tokens.min(i32::MAX as usize) as i32,
            penalty: spec.repetition_penalty,
            eos: spec.eos,
            start: spec.decoder_start,
        };
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (VOCAB_THREADS, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch("process_logits", cfg, &[&params])?;
        Ok(out)
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
        let t = spec.max_new_tokens;
        let scratch_ids = self.gpu.alloc::<u32>(2 * n * t)?;
        let scratch_lp = self.gpu.alloc::<f32>(2 * n * t)?;
        let (step, step_counter) = self.position(step);
        let params = BeamParams {
            logits: self.f32_ptr(logits, "beam_step's logits")?,
            processed: self.f32_ptr(processed, "beam_step's processed scores")?,
            seqs: self.gpu.ptr(&st.seqs.buf),
            logprobs: self.f32_ptr(&st.logprobs, "beam_step's log-probs")?,
            scores: self.f32_ptr(&st.scores, "beam_step's scores")?,
            fin_seqs: self.gpu.ptr(&st.fin_seqs.buf),
            fin_logprobs: self.f32_ptr(&st.fin_logprobs, "beam_step's finished log-probs")?,
            fin_scores: self.f32_ptr(&st.fin_scores, "beam_step's finished scores")?,
            fin_lens: self.gpu.ptr(&st.fin_lens.buf),
            done: self.gpu.ptr(&st.done.buf),
            src: self.gpu.ptr(&st.src.buf),
            next: self.gpu.ptr(&st.next.buf),
            scratch_ids: self.gpu.ptr(&scratch_ids),
            scratch_lp: self.gpu.ptr(&scratch_lp),
            step_counter,
            length_penalty: spec.length_penalty,
            v: v as i32,
            t: t as i32,
            k: spec.num_beams as i32,
            step,
            early: match spec.early_stopping {
                EarlyStopping::False => 0,
                EarlyStopping::True => 1,
                EarlyStopping::Never => 2,
            },
            eos: spec.eos,
            pad: spec.pad,
        };
        let items = n / spec.num_beams;
        let cfg = LaunchConfig { grid_dim: (items as u32, 1, 1), block_dim: (BEAM_THREADS, 1, 1), shared_mem_bytes: 0 };
        self.gpu.launch("beam_step", cfg, &[&params])
    }

    fn gather_beams_impl(&self, x: &mut Self::Tensor, src: &Self::Ids, upto: Position<'_, Self>) -> Result<()> {
        let (n, cap, d) = (x.shape[0], x.shape[1], x.shape[2]);
        let elem = if matches!(x.buf, Buf::F16(_)) { 2 } else { 4 };
        let (name, unit) = match (d * elem % 16, elem) {
            (0, _) => ("vec", 16),
            (_, 4) => ("u32", 4),
            _ => ("u16", 2),
        };
        let units = d * elem / unit;
        let tmp = self.gpu.alloc::<u8>(n * cap * d * elem)?;
        let (at, counter) = self.position(upto);
        let (xp, tp, sp) = (self.ptr_t(x), self.gpu.ptr(&tmp), self.gpu.ptr(&src.buf));
        let (n, cap, units) = (n as i64, cap as i32, units as i32);
        let grid = elementwise(n as usize * cap as usize * units as usize);
        let args: [&dyn device::Arg; 8] = [&xp, &tp, &sp, &counter, &at, &n, &cap, &units];
        self.gpu.launch(&format!("gather_beams_out_{name}"), grid, &args)?;
        self.gpu.launch(&format!("gather_beams_in_{name}"), grid, &args)
    }
}

/// Mirrors `ProcessParams` in kernels/sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ProcessParams {
    logits: u64,
    out: u64,
    history: u64,
    step_counter: u64,
    v: i32,
    t: i32,
    step: i32,
    log_softmax: i32,
    ngram: i32,
    min_new: i32,
    penalty: f32,
    eos: u32,
    start: u32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for ProcessParams {}

/// Mirrors `BeamParams` in kernels/sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct BeamParams {
    logits: u64,
    processed: u64,
    seqs: u64,
    logprobs: u64,
    scores: u64,
    fin_seqs: u64,
    fin_logprobs: u64,
    fin_scores: u64,
    fin_lens: u64,
    done: u64,
    src: u64,
    next: u64,
    scratch_ids: u64,
    scratch_lp: u64,
    step_counter: u64,
    length_penalty: f64,
    v: i32,
    t: i32,
    k: i32,
    step: i32,
    early: i32,
    eos: u32,
    pad: u32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for BeamParams {}

impl Cuda {
    /// The address of an f32 tensor (these kernels read and write f32 only).
    fn f32_ptr(&self, t: &CudaTensor, what: &str) -> Result<u64> {
        match &t.buf {
            Buf::F32(s) => Ok(self.gpu.ptr(s)),
            Buf::F16(_) => bail!("{what} must be f32, not half"),
        }
    }
}
