//! The arguments the op families take beyond tensors: dropout, LoRA branches and their gradients,
//! Adam's step and slots, the position bias, attention and sampling specs, positions and storage
//! precisions.

use super::Device;

/// Inverted dropout whose mask is a pure function of (seed, stream, element index), so the forward
/// and backward passes, and the CPU and the GPU, draw the same mask without storing it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    pub stream: u64,
}

impl Dropout {
    /// The mask's key (`rng::dropout_key`), drawn once per call rather than once per element.
    pub fn key(&self) -> u64 {
        super::rng::dropout_key(self.seed, self.stream)
    }
}

/// The low-rank branch of one LoRA module: `y[:, col..col + out] += scale · B(A(dropout(x)))`. A
/// product may carry several, one per module whose rows its weight stacks.
pub struct LoraRef<'a, B: Device> {
    /// `[r, in]`
    pub a: &'a B::Tensor,
    /// `[out, r]`
    pub b: &'a B::Tensor,
    /// a and b as `LinearOps::matmul_copy` made them, if it did.
    pub shadow: Option<(&'a B::Tensor, &'a B::Tensor)>,
    pub scale: f32,
    /// First output column of this module.
    pub col: usize,
    pub dropout: Option<Dropout>,
}

/// Where one LoRA branch's gradients accumulate (`LinearOps::linear_backward`).
pub struct LoraGrad<'a, B: Device> {
    /// `[r, in]`
    pub a: &'a mut B::Tensor,
    /// `[out, r]`
    pub b: &'a mut B::Tensor,
}

/// Adam's hyper-parameters for one update (torch.optim.Adam's, bias-corrected).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 1 for the first update.
    pub step: u64,
    /// Every gradient is multiplied by this first (undoing loss scaling, clipping the norm).
    pub grad_scale: f32,
}

/// One tensor of a multi-tensor Adam update: the parameter `p` with gradient `g` and moments `m`,
/// `v` (all f32, one shape).
pub struct AdamSlot<'a, B: Device> {
    pub p: &'a mut B::Tensor,
    pub g: &'a B::Tensor,
    pub m: &'a mut B::Tensor,
    pub v: &'a mut B::Tensor,
    /// AdamW's decoupled weight decay: `p ← p · (1 − lr · weight_decay)` before the update (0: Adam).
    pub weight_decay: f64,
    /// `matmul_copy`'s copy of `p`, rewritten with the updated values in the same pass.
    pub copy: Option<&'a mut B::Tensor>,
}

/// The f32 constants of one Adam update, derived in f64 as torch derives them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamFactors {
    /// 1 − β₁ (the weight of torch's lerp of the first moment)
    pub w1: f32,
    pub beta2: f32,
    /// 1 − β₂
    pub w2: f32,
    /// −lr / (1 − β₁ᵗ)
    pub neg_step: f32,
    /// √(1 − β₂ᵗ)
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// 1 − lr · weight_decay
    pub decay: f32,
}

impl AdamStep {
    pub fn factors(&self, weight_decay: f64) -> AdamFactors {
        let t = self.step as f64;
        AdamFactors {
            w1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            w2: (1.0 - self.beta2) as f32,
            neg_step: (-self.lr / (1.0 - self.beta1.powf(t))) as f32,
            bc2_sqrt: (1.0 - self.beta2.powf(t)).sqrt() as f32,
            eps: self.eps as f32,
            decay: (1.0 - self.lr * weight_decay) as f32,
        }
    }
}

/// Adafactor's options (transformers' `Adafactor`, argument for argument), fixed for a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdafactorOptions {
    /// Added to g² before the running means.
    pub eps1: f64,
    /// The least parameter RMS `scale_parameter` scales by.
    pub eps2: f64,
    /// The update's RMS is clipped to this.
    pub clip_threshold: f64,
    /// β₂ of step t is 1 − t^decay_rate.
    pub decay_rate: f64,
    /// The first moment's β₁ (None: no first moment).
    pub beta1: Option<f64>,
    /// The rate is multiplied by max(eps2, RMS(p)).
    pub scale_parameter: bool,
    /// The rate is min(1e-2, 1/√t) (with `warmup_init`, min(1e-6·t, 1/√t)) instead of `lr`.
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl AdafactorOptions {
    /// The backend's step `step` (1-based) at external rate `lr`, gradients scaled by `grad_scale`.
    pub fn step(&self, lr: f64, step: u64, grad_scale: f32) -> AdafactorStep {
        AdafactorStep { options: *self, lr, step, grad_scale }
    }
}

/// One Adafactor update: the run's options and this step's rate, count and gradient scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdafactorStep {
    pub options: AdafactorOptions,
    /// The external learning rate; unused with `relative_step`.
    pub lr: f64,
    /// 1 for the first update.
    pub step: u64,
    /// Every gradient is multiplied by this first (undoing loss scaling, clipping the norm).
    pub grad_scale: f32,
}

impl AdafactorStep {
    /// The rate before `scale_parameter`'s factor (transformers' `rel_step_sz`).
    pub fn relative_lr(&self) -> f64 {
        if !self.options.relative_step {
            return self.lr;
        }
        let t = self.step as f64;
        let min_step = if self.options.warmup_init { 1e-6 * t } else { 1e-2 };
        min_step.min(1.0 / t.sqrt())
    }

    /// β₂ of this step: 1 − t^decay_rate.
    pub fn beta2t(&self) -> f64 {
        1.0 - (self.step as f64).powf(self.options.decay_rate)
    }
}

/// One weight of an Adafactor update. A 2-D `p [R, C]` stacks `parts` (row counts summing to R),
/// each its own Adafactor tensor as transformers would see it (q, k and v of a fused projection):
/// its own factored second moments, parameter RMS and update clipping. A 1-D `p [n]` is one part
/// with an unfactored second moment.
pub struct AdafactorSlot<'a, B: Device> {
    pub p: &'a mut B::Tensor,
    pub g: &'a B::Tensor,
    /// Rows per part (2-D); `[n]` for 1-D.
    pub parts: Vec<usize>,
    /// 2-D: each row's running mean of g² + eps1 over its columns, `[R]`; 1-D: the running mean
    /// of g² + eps1 itself, `[n]`.
    pub row: &'a mut B::Tensor,
    /// 2-D: each part's column means over its rows, `[parts, C]`; 1-D: empty, `[0]`.
    pub col: &'a mut B::Tensor,
    /// The first moment, `p`'s shape, when `beta1` is set.
    pub m: Option<&'a mut B::Tensor>,
    /// transformers' `weight_decay`: `p ← p − weight_decay · lr · p` before the update.
    pub weight_decay: f64,
    /// `matmul_copy`'s copy of `p`, rewritten with the updated values.
    pub copy: Option<&'a mut B::Tensor>,
}

/// T5's learned relative position bias, looked up inside attention.
pub struct RelBias<'a, B: Device> {
    /// `relative_attention_bias.weight`, `[num_buckets, heads]`
    pub table: &'a B::Weight,
    pub bidirectional: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
}

/// The storage a backend may give a tensor whose only consumers are matrix products or attention:
/// `Half` lets the GPU keep it in fp16 (DESIGN.md's precision policy); the CPU keeps f32 always.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prec {
    F32,
    Half,
}

/// Element-wise activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// BERT's exact GELU, `0.5 x (1 + erf(x / √2))`.
    GeluErf,
    /// T5 v1.1's tanh approximation.
    GeluNew,
    Tanh,
}

/// Where a decoding loop stands. `Counter` is a one-element ids tensor that the loop moves with
/// `advance`, so that a step captured once as a GPU graph replays at the current position.
pub enum Position<'a, B: Device> {
    At(usize),
    Counter(&'a B::Ids),
}

impl<B: Device> Clone for Position<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Device> Copy for Position<'_, B> {}

/// What one attention call needs beyond q, k and v.
pub struct AttnSpec<'a, B: Device> {
    pub heads: usize,
    pub d_kv: usize,
    /// Multiplies q·k: 1 for T5 (unscaled), 1/√d_kv for BERT.
    pub scale: f32,
    /// Keys `0..kv_len` of k and v take part (k and v may hold more rows: a KV cache); with a
    /// `Counter` offset, keys `0..counter + Lq` instead, the cache so far.
    pub kv_len: usize,
    /// Per batch row, how many leading keys are real (the rest is right padding).
    pub key_lengths: Option<&'a B::Ids>,
    /// Query `i` sits at position `q_offset + i` and, when causal, sees keys `0..=q_offset + i`.
    pub causal: bool,
    pub q_offset: Position<'a, B>,
    pub bias: Option<RelBias<'a, B>>,
    /// Dropout on the probabilities (T5's training mode), applied inside the kernels and drawn
    /// again in the backward: element `((b·H + h)·Lq + i)·Lk + j` of the `[B, H, Lq, Lk]`
    /// probabilities, `Lk` being `kv_len`. Needs a host position.
    pub dropout: Option<Dropout>,
}

/// What a training forward of attention keeps for its backward: the output `[B, Lq, H·dk]` and
/// each query row's log-sum-exp of its scores `[B, H, Lq]` (+∞ for a row without keys).
pub struct Attended<T> {
    pub out: T,
    pub lse: T,
}

/// Where attention reads q, k and v. `attention_backward` returns the gradients in the same
/// stacking, so that the projection that made them reads them in place (in half, as its products
/// do), and the forward reads the projection's output without splitting it.
pub enum AttnInputs<'a, T> {
    /// Self-attention from one q/k/v projection: q | k | v in one `[B, L, 3·inner]` tensor.
    Qkv(&'a T),
    /// Cross-attention, k and v from one projection: q `[B, Lq, inner]` and k | v in one
    /// `[B, Lk, 2·inner]`.
    QAndKv { q: &'a T, kv: &'a T },
    /// q `[B, Lq, inner]`, k and v `[B, Lk, inner]` apart (a decoding cache, or separate
    /// projections): the forward only, since the backward's gradients take a projection's stacking.
    Apart { q: &'a T, k: &'a T, v: &'a T },
}

impl<T> Clone for AttnInputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for AttnInputs<'_, T> {}

/// `attention_backward`'s gradients, in the stacking of its inputs.
pub enum AttnGrads<T> {
    Qkv(T),
    QAndKv { q: T, kv: T },
}

impl<T> AttnGrads<T> {
    /// The stacked dq | dk | dv of `AttnInputs::Qkv`.
    pub fn qkv(self) -> anyhow::Result<T> {
        match self {
            AttnGrads::Qkv(t) => Ok(t),
            AttnGrads::QAndKv { .. } => anyhow::bail!("attention gradients laid out as q and kv, not qkv"),
        }
    }

    /// dq and the stacked dk | dv of `AttnInputs::QAndKv`.
    pub fn q_kv(self) -> anyhow::Result<(T, T)> {
        match self {
            AttnGrads::QAndKv { q, kv } => Ok((q, kv)),
            AttnGrads::Qkv(_) => anyhow::bail!("attention gradients laid out as qkv, not q and kv"),
        }
    }
}

/// How the next token is chosen (Hugging Face's processor order: min-length, temperature, top-k,
/// top-p, then a draw).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleSpec {
    /// Argmax instead of a draw; temperature, top-k, top-p and the seed are then unused.
    pub greedy: bool,
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 1.0 keeps every token.
    pub top_p: f32,
    pub seed: u64,
    pub eos: u32,
    pub pad: u32,
    /// EOS is forbidden while fewer than this many tokens have been generated.
    pub min_new_tokens: usize,
}

/// Hugging Face's logits processors that look at the decoder ids so far (the start token and the
/// generated tokens), in its order: repetition penalty, no-repeat n-grams, then min-new-tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessSpec {
    /// Process `log_softmax(logits)`, as beam search does, instead of the raw logits (greedy and
    /// sampling).
    pub log_softmax: bool,
    /// A token already in the ids has its score `s` replaced by `s · p` when `s < 0`, else `s / p`
    /// (1.0: off).
    pub repetition_penalty: f32,
    /// A token that would repeat an n-gram of this size already in the ids is banned (0: off).
    pub no_repeat_ngram_size: usize,
    /// EOS is banned while fewer than this many tokens have been generated.
    pub min_new_tokens: usize,
    pub eos: u32,
    /// The decoder start token: the first of the ids the processors see.
    pub decoder_start: u32,
}

impl ProcessSpec {
    /// Whether any processor changes a score (else `process_logits` only copies or normalises).
    pub fn any(&self) -> bool {
        self.repetition_penalty != 1.0 || self.no_repeat_ngram_size > 0 || self.min_new_tokens > 0
    }
}

/// When beam search stops a batch item (Hugging Face's `early_stopping`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop once `num_beams` hypotheses are finished and the best running beam, scored at its
    /// current length, cannot beat the worst of them (Hugging Face's default heuristic).
    #[default]
    False,
    /// Stop as soon as `num_beams` hypotheses are finished.
    True,
    /// As `False`, but with a positive length penalty the best running beam is scored at the
    /// longest length it could reach (the canonical beam search).
    Never,
}

/// One beam-search step's settings (Hugging Face's `_beam_search`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamSpec {
    pub num_beams: usize,
    /// A finished hypothesis scores `Σ log-probs / length^length_penalty`, its length counting
    /// the generated tokens (EOS included).
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// A hypothesis that reaches this many tokens is finished.
    pub max_new_tokens: usize,
    pub eos: u32,
    /// The token fed to the rows of finished batch items.
    pub pad: u32,
}

impl BeamSpec {
    /// `length^length_penalty` as Hugging Face divides by it: a double power, then f32.
    pub fn penalty(&self, length: usize) -> f32 {
        (length as f64).powf(self.length_penalty) as f32
    }
}

/// Beam search's state on the device, for `B` batch items of `K` beams (rows `b·K + k`) and up to
/// `T` new tokens; `SamplingOps::beam_step` advances it one token.
pub struct BeamState<D: Device> {
    /// `[B·K, T]` each running beam's tokens so far.
    pub seqs: D::Ids,
    /// `[B·K, T]` their log-probabilities under the model's own (unprocessed) distribution.
    pub logprobs: D::Tensor,
    /// `[B·K]` each running beam's score: the sum of its processed log-probabilities.
    pub scores: D::Tensor,
    /// `[B·K]` slot `b·K + j` holds item b's j-th best finished hypothesis: its tokens, their
    /// log-probabilities, its length-penalised score and its length (0: the slot is empty).
    pub fin_seqs: D::Ids,
    pub fin_logprobs: D::Tensor,
    pub fin_scores: D::Tensor,
    pub fin_lens: D::Ids,
    /// `[B]` 1 once an item's finished hypotheses can no longer change.
    pub done: D::Ids,
    /// `[B·K]` the row each new beam continues: the KV caches are gathered by it.
    pub src: D::Ids,
    /// `[B·K, 1]` each new beam's last token, the decoder's next input.
    pub next: D::Ids,
}

impl<D: Device> BeamState<D> {
    /// `items` items, each starting from one beam at the start token (the other beams score −1e9,
    /// as in Hugging Face, so that the first step expands beam 0 only).
    pub fn new(be: &D, items: usize, spec: &BeamSpec, start: u32) -> anyhow::Result<Self> {
        let (k, t) = (spec.num_beams, spec.max_new_tokens);
        let n = items * k;
        let scores: Vec<f32> = (0..n).map(|i| if i % k == 0 { 0.0 } else { -1e9 }).collect();
        Ok(Self {
            seqs: be.upload_ids(&vec![spec.pad; n * t], &[n, t])?,
            logprobs: be.zeros(&[n, t])?,
            scores: be.upload(&scores, &[n])?,
            fin_seqs: be.upload_ids(&vec![spec.pad; n * t], &[n, t])?,
            fin_logprobs: be.zeros(&[n, t])?,
            fin_scores: be.upload(&vec![-1e9; n], &[n])?,
            fin_lens: be.upload_ids(&vec![0; n], &[n])?,
            done: be.upload_ids(&vec![0; items], &[items])?,
            src: be.upload_ids(&(0..n as u32).collect::<Vec<_>>(), &[n])?,
            next: be.upload_ids(&vec![start; n], &[n, 1])?,
        })
    }
}
