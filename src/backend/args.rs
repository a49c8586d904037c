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

/// Adafactor's hyper-parameters for one update (transformers' `Adafactor`, argument for argument).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdafactorStep {
    /// The external learning rate; unused with `relative_step`.
    pub lr: f64,
    /// 1 for the first update.
    pub step: u64,
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
    /// Every gradient is multiplied by this first (undoing loss scaling, clipping the norm).
    pub grad_scale: f32,
}

impl AdafactorStep {
    /// The rate before `scale_parameter`'s factor (transformers' `rel_step_sz`).
    pub fn relative_lr(&self) -> f64 {
        if !self.relative_step {
            return self.lr;
        }
        let t = self.step as f64;
        let min_step = if self.warmup_init { 1e-6 * t } else { 1e-2 };
        min_step.min(1.0 / t.sqrt())
    }

    /// β₂ of this step: 1 − t^decay_rate.
    pub fn beta2t(&self) -> f64 {
        1.0 - (self.step as f64).powf(self.decay_rate)
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
